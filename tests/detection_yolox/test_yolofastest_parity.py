# SPDX-License-Identifier: Apache-2.0
"""Parity of ``yolofastest_loss`` with the per-image reference (``yolofastest_reference.py``): foreground
set, matched ground truths and IoUs, every term (<= 1e-5 relative) and the gradient of every term
(<= 1e-4) on seeded batches, including empty images, crowded images, tiny boxes, boxes larger than
any anchor and a single level."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from yolofastest_cases import V2_ANCHORS, fresh, make_batch
from yolofastest_reference import ReferenceYOLOFastest

from losskit_detection_yolox import YOLOFastestLoss

TERMS = ("iou", "obj", "cls")


def assert_parity(
    out: dict[str, Any], target: dict[str, Any], anchors: Sequence[Sequence[float]], **fields: Any
) -> ReferenceYOLOFastest:
    """Compare losskit with the reference on one batch; returns the reference (for its stats)."""
    num_classes = out["pred"][0].shape[2] - 5
    reference = ReferenceYOLOFastest(num_classes, anchors, **fields)
    ref_out = fresh(out)
    ref_terms, ref_assign = reference(ref_out["pred"], target["gt"], target["img_size"])

    crit = YOLOFastestLoss(anchors=anchors, **fields)
    assignment = crit.assign(out, target)
    for i, ref in enumerate(ref_assign):
        assert torch.equal(assignment.fg_mask[i], ref["fg_mask"]), f"image {i}: foreground differs"
        assert torch.equal(assignment.matched_gt[i], ref["matched_gt"]), f"image {i}: matched gt differs"
        torch.testing.assert_close(assignment.matched_iou[i], ref["matched_iou"], rtol=1e-5, atol=1e-6)

    mine_out = fresh(out)
    terms = crit(mine_out, target)
    assert tuple(terms) == TERMS and tuple(terms.diagnostics) == ("num_fg", "invalid_targets")
    assert float(terms.diagnostics["num_fg"]) == sum(int(r["fg_mask"].sum()) for r in ref_assign)
    for name in TERMS:
        want, got = ref_terms[name], terms[name]
        w, v = float(want.detach()), float(got.detach())
        assert math.isfinite(v)
        assert abs(v - w) <= 1e-5 * abs(w) + 1e-7, (name, v, w)
        g_want = torch.autograd.grad(want, ref_out["pred"], retain_graph=True, allow_unused=True)
        g_got = torch.autograd.grad(got, mine_out["pred"], retain_graph=True, allow_unused=True)
        for a, b in zip(g_want, g_got):
            a = torch.zeros_like(b) if a is None else a
            b = torch.zeros_like(a) if b is None else b
            assert float((a - b).abs().max()) <= 1e-4, name
    return reference


CASES = [
    # seed, batch, kind, (min, max) boxes per image, informed fraction
    (0, 2, "random", (1, 30), 0.5),
    (1, 3, "random", (0, 20), 1.0),
    (2, 2, "tiny", (1, 30), 0.7),
    (3, 2, "border", (1, 30), 1.0),
    (4, 4, "mixed", (0, 15), 0.7),
    (5, 2, "random", (0, 12), 0.0),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[2]}-b{c[1]}-s{c[0]}" for c in CASES])
def test_parity_random_batches(case: tuple[Any, ...]) -> None:
    seed, batch, kind, gts, informed = case
    out, target = make_batch(seed, batch=batch, num_classes=6, img=192, gts=gts, kind=kind, informed=informed)
    assert_parity(out, target, V2_ANCHORS)


def test_parity_empty_images_between_crowded_ones() -> None:
    # ~100 boxes in one image, none in two others
    out, target = make_batch(11, batch=4, num_classes=4, img=192, counts=[0, 100, 0, 40], informed=0.8)
    reference = assert_parity(out, target, V2_ANCHORS)
    assert reference.stats["conflicts"] > 0 and reference.stats["dynamic_k>1"] > 0


def test_parity_all_images_empty() -> None:
    out, target = make_batch(12, batch=2, num_classes=3, img=128, counts=[0, 0])
    assert_parity(out, target, V2_ANCHORS)


def test_parity_tiny_boxes() -> None:
    out, target = make_batch(13, batch=2, num_classes=5, img=192, counts=[25, 10], kind="tiny", informed=1.0)
    assert_parity(out, target, V2_ANCHORS)


def test_parity_boxes_larger_than_any_anchor() -> None:
    # anchors of at most 20 px decode to at most 80 px: boxes of 100-190 px are out of every anchor's reach
    small = ((8.0, 10.0, 12.0, 16.0), (16.0, 12.0, 20.0, 20.0))
    out, target = make_batch(14, batch=2, num_classes=4, img=192, counts=[6, 3], anchors=small, informed=1.0)
    for item in target["gt"]:
        centre = (item["boxes"][:, :2] + item["boxes"][:, 2:]) / 2
        half = torch.full_like(centre, 50.0) + torch.rand(centre.shape, generator=torch.Generator()) * 45
        item["boxes"] = torch.cat((centre - half, centre + half), 1).clamp(0, 192)
    reference = assert_parity(out, target, small)
    assert reference.stats["gts"] == 9
    # and with the v2 anchors (at most 242 px wide): boxes covering the whole 352 input
    out, target = make_batch(15, batch=1, num_classes=4, img=352, counts=[3], informed=1.0)
    target["gt"][0]["boxes"] = torch.tensor(
        [[0.0, 0.0, 352.0, 352.0], [2.0, 5.0, 350.0, 340.0], [0, 0, 300, 9]]
    )
    assert_parity(out, target, V2_ANCHORS)


def test_parity_single_level() -> None:
    anchors = ((10.0, 14.0, 23.0, 27.0, 37.0, 58.0, 81.0, 82.0),)  # 4 anchors per cell
    out, target = make_batch(
        16, batch=3, num_classes=3, img=128, strides=(16,), anchors=anchors, gts=(0, 20), kind="mixed"
    )
    assert_parity(out, target, anchors)


@pytest.mark.parametrize(
    "fields",
    [
        {"iou_loss": "iou"},
        {"center_radius": 2.5, "candidate_topk": 5, "iou_cost_weight": 1.0, "reg_weight": 2.0},
    ],
    ids=["iou", "wide-prior"],
)
def test_parity_non_default_fields(fields: dict[str, Any]) -> None:
    out, target = make_batch(21, batch=2, num_classes=5, img=192, gts=(1, 25), kind="mixed", informed=0.8)
    assert_parity(out, target, V2_ANCHORS, **fields)


def test_parity_at_the_benchmark_scale() -> None:
    # 352 x 352 input (3 x (22^2 + 11^2) = 1815 anchors), 80 classes, 12 and 50 boxes
    out, target = make_batch(5, batch=2, num_classes=80, img=352, counts=[12, 50], informed=0.5)
    assert_parity(out, target, V2_ANCHORS)


def test_random_cases_exercise_simota() -> None:
    """The random cases above reach the interesting branches of SimOTA."""
    reference = ReferenceYOLOFastest(6, V2_ANCHORS)
    for seed, batch, kind, gts, informed in CASES:
        out, target = make_batch(
            seed, batch=batch, num_classes=6, img=192, gts=gts, kind=kind, informed=informed
        )
        reference(out["pred"], target["gt"], 192)
    assert reference.stats["gts"] > 100
    assert reference.stats["dynamic_k>1"] > 20
    assert reference.stats["conflicts"] > 10
