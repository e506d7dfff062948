# SPDX-License-Identifier: Apache-2.0
"""Property-based fuzzing of retinanet_loss inputs: a finite loss or a LosskitError naming the key."""

from __future__ import annotations

import copy

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import losskit
from losskit_detection_retinanet import RetinaNetLoss

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SPECIALS = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 0.0]
FUZZ = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


def _boxes(data, n, g, *, allow_bad):
    xy = torch.rand(n, 2, generator=g) * 50
    wh = 1.0 + torch.rand(n, 2, generator=g) * 30
    boxes = torch.cat([xy, xy + wh], 1)
    if allow_bad and n and data.draw(st.booleans(), label="corrupt boxes"):
        i = data.draw(st.integers(0, n - 1))
        kind = data.draw(st.sampled_from(["zero", "negative", "nan", "inf"]))
        if kind == "zero":
            boxes[i, 2] = boxes[i, 0]
        elif kind == "negative":
            boxes[i, 3] = boxes[i, 1] - 5
        else:
            boxes[i, data.draw(st.integers(0, 3))] = float("nan") if kind == "nan" else float("inf")
    return boxes


def _draw_inputs(data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    b = data.draw(st.integers(0, 3), label="B")
    c = data.draw(st.integers(1, 4), label="C")
    sizes = data.draw(st.lists(st.integers(0, 12), min_size=1, max_size=3), label="level sizes")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    as_list = data.draw(st.booleans(), label="levels as list")
    cls = [torch.randn(b, n, c, generator=g).to(dtype) for n in sizes]
    reg = [(0.2 * torch.randn(b, n, 4, generator=g)).to(dtype) for n in sizes]
    if data.draw(st.booleans(), label="special logits") and b and sum(sizes):
        lvl = data.draw(st.sampled_from([i for i, n in enumerate(sizes) if n]))
        target = data.draw(st.sampled_from(["cls", "reg"]))
        t = (cls if target == "cls" else reg)[lvl]
        t.view(-1)[data.draw(st.integers(0, t.numel() - 1))] = data.draw(st.sampled_from(SPECIALS))
    anchors = _boxes(data, sum(sizes), g, allow_bad=True).to(dtype)
    gt = []
    for _ in range(b):
        n = data.draw(st.integers(0, 4))
        labels = torch.randint(0, c, (n,), generator=g)
        if n and data.draw(st.booleans(), label="bad label"):
            labels[0] = data.draw(st.sampled_from([-1, c, c + 7]))
        gt.append({"boxes": _boxes(data, n, g, allow_bad=True).to(dtype), "labels": labels})
    for t in cls + reg:
        t.requires_grad_()
    out = {
        "cls_logits": cls if as_list else torch.cat(cls, 1).detach().requires_grad_(),
        "bbox_regression": reg if as_list else torch.cat(reg, 1).detach().requires_grad_(),
        "anchors": anchors,
    }
    target = {"gt": gt}
    # structural damage: a missing key, a wrong type, a wrong count
    damage = data.draw(
        st.sampled_from(["none", "none", "none", "drop_out", "drop_target", "anchors_list", "gt_short"])
    )
    if damage == "drop_out":
        out.pop(data.draw(st.sampled_from(sorted(out))))
    elif damage == "drop_target" and gt:
        gt[0].pop(data.draw(st.sampled_from(["boxes", "labels"])))
    elif damage == "anchors_list":
        out["anchors"] = [anchors] * (b + data.draw(st.integers(0, 1)))
    elif damage == "gt_short" and gt:
        target["gt"] = gt[:-1]
    cfg = {"box_loss": data.draw(st.sampled_from(["l1", "smooth_l1", "giou", "diou", "ciou"]))}
    return out, target, cfg


def _snapshot(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_snapshot(v) for v in obj]
    return copy.copy(obj)


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return (
            a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.detach().nan_to_num(), b.nan_to_num())
        )
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@FUZZ
@given(st.data())
def test_fuzz_finite_or_named_error(data):
    out, target, cfg = _draw_inputs(data)
    before = _snapshot((out, target))
    crit = RetinaNetLoss(**cfg)
    try:
        res = crit(out, target)
    except losskit.LosskitError as e:
        msg = str(e)
        event(f"error: {type(e).__name__}")
        assert msg.startswith("retinanet_loss: "), msg
        assert "out" in msg or "target" in msg, msg
    else:
        event("finite loss")
        total = res.total
        assert torch.isfinite(total.detach()), (cfg, res)
        assert list(res) == ["classification", "bbox_regression"]
        if total.requires_grad:
            total.backward()
    assert _same(before, _snapshot((out, target))), "inputs were mutated"


@FUZZ
@given(st.data())
def test_fuzz_match_consistent_with_forward(data):
    """When the loss is computed, ``match`` gives the counts the diagnostics report."""
    out, target, cfg = _draw_inputs(data)
    crit = RetinaNetLoss(**cfg)
    try:
        res = crit(out, target)
    except losskit.LosskitError:
        return
    m = crit.match(out, target)
    assert m.dtype == torch.int64 and bool((m >= -2).all())
    assert float(res.diagnostics["num_fg"]) == float((m >= 0).sum())
    assert float(res.diagnostics["num_ignored"]) == float((m == -2).sum())
    for i, g in enumerate(target["gt"]):
        assert bool((m[i] < max(1, g["boxes"].shape[0])).all())
