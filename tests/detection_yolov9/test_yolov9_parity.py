# SPDX-License-Identifier: Apache-2.0
"""Parity with the per-image reference (``yolov9_reference.py``): terms, gradients, assignment."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from yolov9_cases import case
from yolov9_reference import ReferenceYOLOv9

from losskit_detection_yolov9 import YOLOv9Loss


def _tiny_and_flat(seed: int) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]], tuple[int, int]]:
    """Tiny boxes (under a stride), zero-width and zero-height boxes, a point, boxes on the border."""
    pred, gt, img = case([6, 5], seed=seed, bin_slope=0.6)
    gt[0]["boxes"] = torch.tensor(
        [[10.0, 10.0, 11.5, 12.0], [20.0, 20.0, 20.0, 40.0], [30.0, 5.0, 50.0, 5.0], [33.0, 33.0, 33.0, 33.0],
         [3.0, 3.0, 6.0, 5.0], [40.0, 40.0, 44.0, 47.0]]
    )  # fmt: skip
    gt[1]["boxes"] = torch.tensor(
        [[0.0, 0.0, 20.0, 30.0], [44.0, 0.0, 64.0, 64.0], [0.0, 50.0, 64.0, 64.0], [0.0, 0.0, 64.0, 64.0],
         [60.0, 60.0, 64.0, 64.0]]
    )  # fmt: skip
    return pred, gt, img


CASES: dict[str, Any] = {
    "several images": lambda: case([3, 1, 5, 2], seed=1),
    "an image without boxes": lambda: case([4, 0, 2], seed=2),
    "a batch without boxes": lambda: case([0, 0], seed=3),
    "crowded (100 boxes)": lambda: case([100, 7], img=(96, 96), seed=4, max_size=30),
    "tiny, zero-area and border boxes": lambda: _tiny_and_flat(5),
    "odd size 72x100 (strides 7/14/25)": lambda: case([5, 3], img=(72, 100), seed=6),
    "confident classes (sum of targets > 1)": lambda: case([6, 9], seed=7, cls_bias=2.0, bin_slope=0.8),
    "C=1, R=8": lambda: case([4, 6], seed=8, num_classes=1, reg_max=8),
}


def _check(name: str, assigner: str, **config: Any) -> dict[str, float]:
    pred, gt, img = CASES[name]()
    num_classes = pred[0].shape[1] - 4 * config.get("reg_max", 16)
    ref = ReferenceYOLOv9(num_classes, assigner=assigner, **config)
    crit = YOLOv9Loss(assigner=assigner, **config)
    out, target = {"pred": pred}, {"gt": gt, "img_size": img}
    want, matches = ref(pred, gt, img)
    got = crit(out, target)
    for k in ("cls", "iou", "dfl"):
        assert float(got[k]) == pytest.approx(float(want[k]), rel=1e-5, abs=1e-6), k
    g_got = torch.autograd.grad(sum(got.values()), pred)
    g_want = torch.autograd.grad(sum(want.values()), pred)
    for a, b in zip(g_got, g_want):
        assert float((a - b).abs().max()) <= 1e-4 * max(1.0, float(b.abs().max()))
    assignment = crit.assign(out, target)
    assert torch.equal(assignment.fg_mask, torch.stack([m.fg for m in matches]))
    assert torch.equal(assignment.matched_gt, torch.stack([m.matched for m in matches]))
    dense = assignment.class_targets(num_classes)
    torch.testing.assert_close(dense, torch.stack([m.target_cls for m in matches]), rtol=1e-5, atol=1e-7)
    return {"cls_norm": float(got.diagnostics["cls_norm"]), "num_fg": float(got.diagnostics["num_fg"])}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("assigner", ["netspresso", "upstream"])
def test_terms_gradients_and_assignment_match_the_reference(name: str, assigner: str) -> None:
    extra = {"reg_max": 8} if name == "C=1, R=8" else {}
    diag = _check(name, assigner, **extra)
    if name == "a batch without boxes":
        assert diag == {"cls_norm": 1.0, "num_fg": 0.0}
    elif name == "confident classes (sum of targets > 1)":
        assert diag["cls_norm"] > 1.0
    else:
        assert diag["num_fg"] > 0


def test_other_hyper_parameters_match_the_reference() -> None:
    config = {"topk": 3, "iou_factor": 2.0, "cls_factor": 1.0, "reg_max": 16}
    pred, gt, img = case([5, 4], seed=11, cls_bias=1.0, bin_slope=0.7)
    ref = ReferenceYOLOv9(3, weights=(1.0, 2.0, 3.0), **config)
    crit = YOLOv9Loss(cls_weight=1.0, iou_weight=2.0, dfl_weight=3.0, **config)
    want, _ = ref(pred, gt, img)
    got = crit({"pred": pred}, {"gt": gt, "img_size": img})
    for k in want:
        assert float(got[k]) == pytest.approx(float(want[k]), rel=1e-5)
