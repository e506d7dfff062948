# SPDX-License-Identifier: Apache-2.0
"""yolofastest_loss: malformed inputs give a losskit InputError naming the criterion and the key (the
anchor count of a level, the channels, the level count against the configured anchors, ...), and the
caller's outputs and targets are never modified."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from yolofastest_cases import V2_ANCHORS, make_batch

import losskit
from losskit_detection_yolox import YOLOFastestLoss


def batch() -> tuple[dict[str, Any], dict[str, Any]]:
    # levels (2, 3, 8, 4, 4) and (2, 3, 8, 2, 2): C = 3 on a 64 x 64 input
    return make_batch(0, batch=2, num_classes=3, img=64, counts=[2, 1])


def level(i: int, value: Any) -> Callable[[dict, dict], None]:
    return lambda o, t: o["pred"].__setitem__(i, value)


BAD: list[tuple[str, Callable[..., Any], str, str]] = [
    # id, edit(out, target), key in the message, text in the message
    ("out-not-mapping", lambda o, t: (o.clear(), o.update(x=1)), "out['pred']", "missing; out has keys 'x'"),
    (
        "pred-tensor",
        lambda o, t: o.update(pred=o["pred"][0]),
        "out['pred']",
        "got a tensor of shape (2, 3, 8, 4, 4)",
    ),
    (
        "too-few-levels",
        lambda o, t: o["pred"].pop(),
        "out['pred']",
        "got 1 levels but the config's anchors give 2",
    ),
    (
        "too-many-levels",
        lambda o, t: o["pred"].append(torch.zeros(2, 3, 8, 1, 1)),
        "out['pred']",
        "got 3 levels but the config's anchors give 2",
    ),
    ("level-not-tensor", level(1, [1.0]), "out['pred'][1]", "got list"),
    (
        "level-int",
        level(0, torch.zeros(2, 3, 8, 4, 4, dtype=torch.int64)),
        "out['pred'][0]",
        "floating-point",
    ),
    (
        "level-4d",
        level(0, torch.zeros(2, 24, 4, 4)),
        "out['pred'][0]",
        "got shape (2, 24, 4, 4); a (B, nA * (5 + C), H, W) output can be passed as p.view(B, nA, 5 + C, H, W)",
    ),
    (
        "anchor-count",
        level(1, torch.zeros(2, 2, 8, 2, 2)),
        "out['pred'][1]",
        "has 2 anchors per cell (dim 1, shape (2, 2, 8, 2, 2)) but the config's anchors[1] lists 6 values, "
        "3 (w, h) pairs; it must hold 2 * nA values",
    ),
    (
        "too-few-channels",
        level(0, torch.zeros(2, 3, 5, 4, 4)),
        "out['pred'][0]",
        "5 + C channels with C >= 1",
    ),
    (
        "channel-mismatch",
        level(1, torch.zeros(2, 3, 9, 2, 2)),
        "out['pred'][1]",
        "expected 8 channels (5 + C)",
    ),
    ("empty-grid", level(1, torch.zeros(2, 3, 8, 0, 2)), "out['pred'][1]", "non-empty grid"),
    ("batch-mismatch", level(1, torch.zeros(3, 3, 8, 2, 2)), "out['pred'][1]", "batch size 3"),
    (
        "dtype-mismatch",
        level(1, torch.zeros(2, 3, 8, 2, 2, dtype=torch.float64)),
        "out['pred'][1]",
        "float64",
    ),
    ("non-finite-pred", level(1, torch.full((2, 3, 8, 2, 2), float("nan"))), "out['pred'][1]", "non-finite"),
    ("num-classes-target", lambda o, t: t.update(num_classes=4), "target['num_classes']", "does not match"),
    ("gt-missing", lambda o, t: t.pop("gt"), "target['gt']", "missing"),
    ("gt-batch-mismatch", lambda o, t: t["gt"].pop(), "target['gt']", "expected 2 entries"),
    (
        "boxes-n5",
        lambda o, t: t["gt"][0].update(boxes=torch.zeros(2, 5)),
        "target['gt'][0]['boxes']",
        "(n, 4)",
    ),
    (
        "labels-too-big",
        lambda o, t: t["gt"][0].update(labels=torch.tensor([0, 3])),
        "target['gt'][0]['labels']",
        "class 3 is out of range",
    ),
    (
        "boxes-inverted",
        lambda o, t: t["gt"][1].update(boxes=torch.tensor([[10.0, 2.0, 5.0, 9.0]])),
        "target['gt'][1]['boxes']",
        "x2 >= x1",
    ),
    ("img-size-missing", lambda o, t: t.pop("img_size"), "target['img_size']", "missing"),
    ("img-size-zero", lambda o, t: t.update(img_size=0), "target['img_size']", "positive"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_malformed_inputs_are_named(case: tuple[str, Callable, str, str]) -> None:
    _, edit, key, text = case
    out, target = batch()
    edit(out, target)
    with pytest.raises(losskit.InputError) as info:
        YOLOFastestLoss(anchors=V2_ANCHORS)(out, target)
    message = str(info.value)
    assert message.startswith(f"yolofastest_loss: {key}: "), message
    assert text in message, message
    assert info.value.criterion == "yolofastest_loss"


def test_config_mismatch_and_the_assignment_path_are_named_too() -> None:
    out, target = batch()
    with pytest.raises(losskit.InputError, match=r"out\['pred'\]\[0\]: expected 5 \+ num_classes = 9"):
        YOLOFastestLoss(anchors=V2_ANCHORS, num_classes=4)(out, target)
    one_anchor = ((10.0, 10.0), (20.0, 20.0))
    with pytest.raises(losskit.InputError, match=r"has 3 anchors per cell .* anchors\[0\] lists 2 values"):
        YOLOFastestLoss(anchors=one_anchor).assign(out, target)


def test_inputs_are_never_modified() -> None:
    # NetsPresso rewrites target["gt"][i]["boxes"] to cxcywh in place; here nothing changes
    out, target = make_batch(3, batch=3, num_classes=4, img=128, gts=(0, 10), informed=1.0)
    boxes = [g["boxes"] for g in target["gt"]]
    saved_boxes = [b.clone() for b in boxes]
    saved_pred = [p.detach().clone() for p in out["pred"]]
    crit = YOLOFastestLoss(anchors=V2_ANCHORS)
    terms = crit(out, target)
    sum(terms.values()).backward()
    crit.assign(out, target)
    assert all(g["boxes"] is b for g, b in zip(target["gt"], boxes))  # the same objects, same values
    assert all(torch.equal(b, s) for b, s in zip(boxes, saved_boxes))
    assert all(torch.equal(p.detach(), s) for p, s in zip(out["pred"], saved_pred))
    assert set(target) == {"gt", "img_size"} and set(out) == {"pred"}


def test_non_contiguous_outputs_give_the_same_loss() -> None:
    out, target = make_batch(4, batch=2, num_classes=3, img=128, gts=(1, 8), informed=1.0)
    crit = YOLOFastestLoss(anchors=V2_ANCHORS)
    flipped = {"pred": [p.detach().transpose(3, 4).contiguous().transpose(3, 4) for p in out["pred"]]}
    assert not flipped["pred"][0].is_contiguous()
    a, b = crit(out, target), crit(flipped, target)
    for name in a:
        assert torch.equal(a[name], b[name])
