# SPDX-License-Identifier: Apache-2.0
"""Parity with the upstream-structured per-image reference (``yolox_reference.py``): foreground set,
matched ground truths, matched IoUs, every term (<= 1e-5 relative) and the gradient of every term
(<= 1e-4) on seeded random batches."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from yolox_cases import fresh, make_batch
from yolox_reference import ReferenceYOLOX

from losskit_detection_yolox import YOLOXLoss

TERMS = ("iou", "obj", "cls", "l1")


def assert_parity(
    out: dict[str, Any], target: dict[str, Any], *, use_l1: bool, **fields: Any
) -> ReferenceYOLOX:
    """Compare losskit with the reference on one batch; returns the reference (for its stats)."""
    num_classes = out["pred"][0].shape[1] - 5
    reference = ReferenceYOLOX(num_classes, use_l1=use_l1, **fields)
    ref_out = fresh(out)
    ref_terms, ref_assign = reference(ref_out["pred"], target["gt"], target["img_size"])

    crit = YOLOXLoss(**fields)
    crit.set_epoch(1 if use_l1 else 0)
    assignment = crit.assign(out, target)
    for i, ref in enumerate(ref_assign):
        assert torch.equal(assignment.fg_mask[i], ref["fg_mask"]), f"image {i}: foreground differs"
        assert torch.equal(assignment.matched_gt[i], ref["matched_gt"]), f"image {i}: matched gt differs"
        torch.testing.assert_close(assignment.matched_iou[i], ref["matched_iou"], rtol=1e-5, atol=1e-6)

    mine_out = fresh(out)
    terms = crit(mine_out, target)
    assert tuple(terms) == TERMS
    assert float(terms.diagnostics["num_fg"]) == sum(int(r["fg_mask"].sum()) for r in ref_assign)
    for name in TERMS:
        want, got = ref_terms[name], terms[name]
        w, v = float(want.detach()), float(got.detach())
        assert math.isfinite(v)
        assert abs(v - w) <= 1e-5 * abs(w) + 1e-7, (name, v, w)
        if not want.requires_grad:  # the reference's l1 when off is a plain zero
            continue
        g_want = torch.autograd.grad(want, ref_out["pred"], retain_graph=True, allow_unused=True)
        g_got = torch.autograd.grad(got, mine_out["pred"], retain_graph=True, allow_unused=True)
        for a, b in zip(g_want, g_got):
            a = torch.zeros_like(b) if a is None else a
            b = torch.zeros_like(a) if b is None else b
            assert float((a - b).abs().max()) <= 1e-4, name
    return reference


CASES = [
    # seed, batch, kind, (min, max) boxes per image, duplicates, informed fraction
    (0, 1, "random", (1, 60), False, 0.5),
    (1, 2, "random", (0, 60), False, 1.0),
    (2, 3, "tiny", (1, 40), False, 0.5),
    (3, 2, "border", (1, 60), False, 1.0),
    (4, 5, "mixed", (0, 30), True, 0.7),
    (5, 4, "random", (0, 12), True, 1.0),
    (6, 1, "border", (40, 60), True, 0.3),
    (7, 3, "mixed", (0, 60), False, 0.0),
]


@pytest.mark.parametrize("use_l1", [False, True], ids=["no_l1", "l1"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[2]}-b{c[1]}-s{c[0]}" for c in CASES])
def test_parity_random_batches(case: tuple[Any, ...], use_l1: bool) -> None:
    seed, batch, kind, gts, duplicates, informed = case
    out, target = make_batch(
        seed,
        batch=batch,
        num_classes=7,
        img=128,
        gts=gts,
        kind=kind,
        duplicates=duplicates,
        informed=informed,
    )
    assert_parity(out, target, use_l1=use_l1)


def test_parity_empty_images_between_crowded_ones() -> None:
    out, target = make_batch(11, batch=4, num_classes=4, img=128, counts=[0, 60, 0, 25], informed=1.0)
    assert_parity(out, target, use_l1=True)


@pytest.mark.parametrize(
    "fields",
    [
        {"iou_loss": "giou"},
        {"center_radius": 2.5, "candidate_topk": 5, "iou_cost_weight": 1.0, "reg_weight": 2.0},
        {"center_radius": 0.7, "candidate_topk": 3},
    ],
    ids=["giou", "wide-prior", "narrow-prior"],
)
def test_parity_non_default_fields(fields: dict[str, Any]) -> None:
    out, target = make_batch(21, batch=3, num_classes=6, img=128, gts=(1, 30), kind="mixed", informed=0.8)
    assert_parity(out, target, use_l1=True, **fields)


def test_parity_at_coco_scale() -> None:
    # 640 x 640 input (8400 anchors), 80 classes: the benchmark's setting, two images
    out, target = make_batch(5, batch=2, num_classes=80, img=640, counts=[50, 9], informed=0.5)
    assert_parity(out, target, use_l1=True)


def test_parity_when_dynamic_k_exceeds_the_prior() -> None:
    # a box in the corner has 4 prior cells on a 4x4 grid; every cell predicts exactly that box, so
    # its dynamic_k is 10 and it also takes candidates of the other box at cost 1e6 + ...
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        p = torch.randn(1, 9, 4, 4, generator=gen)
        ys, xs = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
        p[0, 0], p[0, 1] = 0.5 - xs, 0.5 - ys  # centre (8, 8) at stride 16
        p[0, 2:4] = 0.0  # 16 x 16
        boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [24.0, 24.0, 56.0, 56.0]])
        out = {"pred": [p.requires_grad_(True)]}
        target = {"gt": [{"boxes": boxes, "labels": torch.tensor([0, 1])}], "img_size": 64}
        reference = assert_parity(out, target, use_l1=True)
        assert reference.stats["k>prior"] == 1


def test_random_cases_exercise_simota() -> None:
    """The random cases above do reach the interesting branches of SimOTA."""
    reference = ReferenceYOLOX(7)
    for seed, batch, kind, gts, duplicates, informed in CASES:
        out, target = make_batch(
            seed,
            batch=batch,
            num_classes=7,
            img=128,
            gts=gts,
            kind=kind,
            duplicates=duplicates,
            informed=informed,
        )
        reference(out["pred"], target["gt"], 128)
    assert reference.stats["gts"] > 300
    assert reference.stats["dynamic_k>1"] > 50
    assert reference.stats["conflicts"] > 20
