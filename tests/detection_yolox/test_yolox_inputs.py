# SPDX-License-Identifier: Apache-2.0
"""Malformed inputs give a losskit InputError naming the criterion and the key; property-based fuzzing
of the inputs (finite result or a losskit error, never a mutated input)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yolox_cases import make_batch

import losskit
from losskit_detection_yolox import YOLOXLoss


def batch() -> tuple[dict[str, Any], dict[str, Any]]:
    return make_batch(0, batch=2, num_classes=3, img=64, counts=[2, 1])


def box(i: int = 0) -> Callable[[dict, dict, Any], None]:
    def edit(out: dict, target: dict, value: Any) -> None:
        target["gt"][i]["boxes"] = value

    return edit


BAD: list[tuple[str, Callable[..., Any], str, str]] = [
    # id, edit(out, target), key in the message, text in the message
    ("out-not-mapping", lambda o, t: (o.clear(), o.update(x=1)), "out['pred']", "missing; out has keys 'x'"),
    (
        "pred-tensor",
        lambda o, t: o.update(pred=o["pred"][0]),
        "out['pred']",
        "got a tensor of shape (2, 8, 8, 8)",
    ),
    ("pred-empty", lambda o, t: o.update(pred=[]), "out['pred']", "empty list"),
    ("level-not-tensor", lambda o, t: o["pred"].__setitem__(1, [1.0]), "out['pred'][1]", "got list"),
    (
        "level-int",
        lambda o, t: o["pred"].__setitem__(0, torch.zeros(2, 8, 8, 8, dtype=torch.int64)),
        "out['pred'][0]",
        "floating-point",
    ),
    (
        "level-3d",
        lambda o, t: o["pred"].__setitem__(0, torch.zeros(2, 8, 64)),
        "out['pred'][0]",
        "got shape (2, 8, 64)",
    ),
    (
        "too-few-channels",
        lambda o, t: o["pred"].__setitem__(0, torch.zeros(2, 5, 8, 8)),
        "out['pred'][0]",
        "5 + C channels",
    ),
    (
        "channel-mismatch",
        lambda o, t: o["pred"].__setitem__(2, torch.zeros(2, 9, 2, 2)),
        "out['pred'][2]",
        "expected 8 channels",
    ),
    (
        "batch-mismatch-levels",
        lambda o, t: o["pred"].__setitem__(1, torch.zeros(3, 8, 4, 4)),
        "out['pred'][1]",
        "batch size 3",
    ),
    (
        "dtype-mismatch",
        lambda o, t: o["pred"].__setitem__(1, torch.zeros(2, 8, 4, 4, dtype=torch.float64)),
        "out['pred'][1]",
        "differs from out['pred'][0]",
    ),
    (
        "non-finite-pred",
        lambda o, t: o["pred"].__setitem__(1, torch.full((2, 8, 4, 4), float("nan"))),
        "out['pred'][1]",
        "non-finite",
    ),
    (
        "num-classes-target",
        lambda o, t: t.update(num_classes=4),
        "target['num_classes']",
        "does not match the 8 channels",
    ),
    (
        "num-classes-not-int",
        lambda o, t: t.update(num_classes="3"),
        "target['num_classes']",
        "expected an int",
    ),
    ("gt-missing", lambda o, t: t.pop("gt"), "target['gt']", "missing; target has keys 'img_size'"),
    ("gt-not-list", lambda o, t: t.update(gt={"boxes": 1}), "target['gt']", "got dict"),
    ("gt-batch-mismatch", lambda o, t: t["gt"].pop(), "target['gt']", "expected 2 entries"),
    (
        "gt-item-not-dict",
        lambda o, t: t["gt"].__setitem__(1, torch.zeros(1, 4)),
        "target['gt'][1]",
        "got Tensor",
    ),
    ("boxes-missing", lambda o, t: t["gt"][0].pop("boxes"), "target['gt'][0]['boxes']", "missing"),
    (
        "boxes-not-tensor",
        lambda o, t: box()(o, t, [[0, 0, 1, 1]]),
        "target['gt'][0]['boxes']",
        "expected a tensor",
    ),
    (
        "boxes-n5",
        lambda o, t: box()(o, t, torch.zeros(2, 5)),
        "target['gt'][0]['boxes']",
        "expected shape (n, 4)",
    ),
    ("boxes-flat", lambda o, t: box()(o, t, torch.zeros(4)), "target['gt'][0]['boxes']", "got shape (4,)"),
    (
        "boxes-nan",
        lambda o, t: box(1)(o, t, torch.tensor([[1.0, 2.0, float("nan"), 9.0]])),
        "target['gt'][1]['boxes']",
        "non-finite",
    ),
    (
        "boxes-inf",
        lambda o, t: box(1)(o, t, torch.tensor([[1.0, 2.0, float("inf"), 9.0]])),
        "target['gt'][1]['boxes']",
        "non-finite",
    ),
    (
        "boxes-negative-size",
        lambda o, t: box(1)(o, t, torch.tensor([[10.0, 2.0, 5.0, 9.0]])),
        "target['gt'][1]['boxes']",
        "x2 >= x1",
    ),
    (
        "labels-count",
        lambda o, t: t["gt"][0].update(labels=torch.zeros(3, dtype=torch.int64)),
        "target['gt'][0]['labels']",
        "expected shape (2,)",
    ),
    (
        "labels-float",
        lambda o, t: t["gt"][0].update(labels=torch.zeros(2)),
        "target['gt'][0]['labels']",
        "integer",
    ),
    (
        "labels-too-big",
        lambda o, t: t["gt"][0].update(labels=torch.tensor([0, 3])),
        "target['gt'][0]['labels']",
        "class 3 is out of range; expected values in [0, 3)",
    ),
    (
        "labels-negative",
        lambda o, t: t["gt"][1].update(labels=torch.tensor([-1])),
        "target['gt'][1]['labels']",
        "class -1 is out of range",
    ),
    ("img-size-missing", lambda o, t: t.pop("img_size"), "target['img_size']", "missing"),
    ("img-size-zero", lambda o, t: t.update(img_size=0), "target['img_size']", "positive"),
    ("img-size-three", lambda o, t: t.update(img_size=(64, 64, 3)), "target['img_size']", "(H, W)"),
    (
        "img-size-tensor",
        lambda o, t: t.update(img_size=torch.tensor([64, 64, 3])),
        "target['img_size']",
        "int or (H, W)",
    ),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_malformed_inputs_are_named(case: tuple[str, Callable, str, str]) -> None:
    _, edit, key, text = case
    out, target = batch()
    edit(out, target)
    with pytest.raises(losskit.InputError) as info:
        YOLOXLoss()(out, target)
    message = str(info.value)
    assert message.startswith(f"yolox_loss: {key}: "), message
    assert text in message, message
    assert info.value.criterion == "yolox_loss"


def test_config_mismatches_are_named() -> None:
    out, target = batch()
    with pytest.raises(
        losskit.InputError, match=r"out\['pred'\]\[0\]: expected 5 \+ num_classes = 9 channels, got 8"
    ):
        YOLOXLoss(num_classes=4)(out, target)
    with pytest.raises(losskit.InputError, match=r"got 3 levels but the config gives 2 strides"):
        YOLOXLoss(strides=(8, 16))(out, target)
    with pytest.raises(losskit.ConfigError, match="iou_loss"):
        YOLOXLoss(iou_loss="ciou")
    with pytest.raises(losskit.ConfigError, match="candidate_topk"):
        YOLOXLoss(candidate_topk=0)


def test_zero_size_boxes_are_allowed() -> None:
    out, target = batch()
    target["gt"][0]["boxes"] = torch.tensor([[10.0, 10.0, 10.0, 10.0], [0.0, 5.0, 0.0, 30.0]])
    terms = YOLOXLoss(l1_activate_epoch=0)(out, target)
    terms.total.backward()
    assert all(torch.isfinite(t) for t in terms.values())
    assert all(torch.isfinite(p.grad).all() for p in out["pred"])


# -- fuzzing --------------------------------------------------------------------------------------

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
special = st.sampled_from([float("nan"), float("inf"), -float("inf")])


@st.composite
def inputs(draw: st.DrawFn) -> tuple[Any, Any]:
    b = draw(st.integers(0, 3))
    c = draw(st.integers(1, 4))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
    sides = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    img = draw(st.sampled_from([16, 32, (24, 40)]))
    scale = draw(st.sampled_from([0.1, 1.0, 30.0]))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    pred = [(torch.randn(b, 5 + c, s, s, generator=gen) * scale).to(dtype) for s in sides]
    if pred[0].numel() and draw(st.integers(0, 9)) == 0:
        pred[0].view(-1)[draw(st.integers(0, pred[0].numel() - 1))] = draw(special)
    gt = []
    for _ in range(b):
        n = draw(st.integers(0, 5))
        if draw(st.integers(0, 4)) > 0:  # mostly boxes around the image, zero sizes included
            centre = torch.rand(n, 2, generator=gen) * 48 - 8
            size = torch.rand(n, 2, generator=gen) * 40 * (torch.rand(n, 1, generator=gen) > 0.2)
            boxes = torch.cat((centre - size / 2, centre + size / 2), 1)
        else:  # arbitrary floats: far away, huge, negative sizes
            boxes = torch.tensor([draw(st.lists(finite, min_size=4, max_size=4)) for _ in range(n)]).reshape(
                n, 4
            )
        if n and draw(st.integers(0, 9)) == 0:
            boxes[0, draw(st.integers(0, 3))] = draw(special)
        labels = torch.randint(0, c, (n,), generator=gen)
        if n and draw(st.integers(0, 9)) == 0:
            labels[0] = draw(st.sampled_from([-1, c, 10**6]))
        gt.append({"boxes": boxes, "labels": labels})
    out: Any = {"pred": pred}
    target: Any = {"gt": gt, "img_size": img}
    damage = draw(st.integers(0, 19))
    if damage == 0:
        target.pop(draw(st.sampled_from(["gt", "img_size"])))
    elif damage == 1 and gt:
        gt[0].pop(draw(st.sampled_from(["boxes", "labels"])))
    elif damage == 2:
        out = {"logits": pred}
    return out, target


def snapshot(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(v) for v in value)
    return copy.deepcopy(value)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return (
            a.dtype == b.dtype
            and a.shape == b.shape
            and bool((a.view(-1).view(torch.uint8) == b.view(-1).view(torch.uint8)).all())
        )
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inputs(), st.booleans())
def test_fuzz_finite_or_named_error_and_inputs_untouched(data: tuple[Any, Any], l1: bool) -> None:
    out, target = data
    before_out, before_target = snapshot(out), snapshot(target)
    crit = YOLOXLoss()
    crit.set_epoch(1 if l1 else 0)
    try:
        terms = crit(out, target)
    except losskit.LosskitError as e:
        assert str(e).startswith("yolox_loss: ") and ("out" in str(e) or "target" in str(e)), str(e)
    else:
        assert tuple(terms) == ("iou", "obj", "cls", "l1")
        assert all(torch.isfinite(t) for t in terms.values()), terms
        leaves = [p.requires_grad_(True) for p in out["pred"]]
        terms = crit({"pred": leaves}, target)
        terms.total.backward()
        assert all(torch.isfinite(p.grad).all() for p in leaves if p.grad is not None)
    assert same(out, before_out) and same(target, before_target)
