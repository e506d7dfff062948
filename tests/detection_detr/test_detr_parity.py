# SPDX-License-Identifier: Apache-2.0
"""Parity with the upstream-structured reference: every term (1e-5 relative), every gradient (1e-4) and
every match, over seeded cases with and without aux and denoising outputs, empty images and batches,
~100 gts, more gts than queries and zero-area boxes."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from detr_cases import case, leaves
from detr_reference import grouped, reference

from losskit_detection_detr import DetrLoss

CASES: dict[str, dict[str, Any]] = {
    "aux+dn": {"counts": (3, 5, 1)},
    "no aux, no dn": {"counts": (3, 5), "aux": False, "dn": False},
    "aux, no dn": {"counts": (4, 2), "dn": False},
    "dn, no aux": {"counts": (2, 6), "aux": False},
    "image without gts": {"counts": (4, 0, 3)},
    "batch without gts": {"counts": (0, 0)},
    "~100 gts": {"counts": (100, 37), "queries": 120, "layers": 2, "num_denoising": 200, "img": 512},
    "more gts than queries": {"counts": (14, 3), "queries": 10},
    "zero-area boxes": {"counts": (5, 4), "zero_area": 2},
    "(H, W) input": {"counts": (3, 2), "img": (48, 80)},
}


def compare(crit: DetrLoss, out: dict[str, Any], target: dict[str, Any], **ref_cfg: Any) -> None:
    ref = reference(out, target, **ref_cfg)
    expected = grouped(ref)
    got = crit(out, target)
    assert set(expected) <= set(got)
    for name, value in got.items():
        want = expected.get(name, torch.zeros(()))
        torch.testing.assert_close(value.detach(), want.detach().float(), rtol=1e-5, atol=1e-6, msg=name)
    # matches: identical (random continuous costs make ties impossible)
    matches = crit.match(out, target)
    for a, b in zip(matches["main"], ref["matches"]["main"], strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert len(matches["aux"]) == len(ref["matches"]["aux"])
    for got_set, ref_set in zip(matches["aux"], ref["matches"]["aux"]):
        for a, b in zip(got_set, ref_set, strict=True):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    if ref["matches"]["dn"] is None:
        assert matches["dn"] is None
    else:
        for a, b in zip(matches["dn"], ref["matches"]["dn"], strict=True):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # gradients of the total with respect to every model output
    xs = leaves(out)
    total_ref = sum(v for k, v in ref.items() if k != "matches")
    g_ref = torch.autograd.grad(total_ref, xs, allow_unused=True)
    g_got = torch.autograd.grad(sum(got.values()), xs, allow_unused=True)
    for x, a, b in zip(xs, g_got, g_ref):
        a = torch.zeros_like(x) if a is None else a
        b = torch.zeros_like(x) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_default_config_matches_reference(name: str) -> None:
    out, target = case(**CASES[name])
    compare(DetrLoss(), out, target)


def test_focal_and_boxes_with_other_weights() -> None:
    out, target = case((4, 2, 6), seed=3)
    weights = {"loss_focal": 2.0, "loss_bbox": 3.0, "loss_giou": 1.5}
    matcher = {
        "weight_dict": {"cost_class": 1.0, "cost_bbox": 4.0, "cost_giou": 3.0},
        "alpha": 0.3,
        "gamma": 1.5,
    }
    crit = DetrLoss(losses=["focal", "boxes"], weight_dict=weights, alpha=0.25, gamma=1.0, matcher=matcher)
    ref_weights = {"loss_vfl": 1.0, "loss_ce": 1.0, **weights}
    ref_matcher = {**matcher, "use_focal_loss": True}
    compare(
        crit,
        out,
        target,
        losses=("focal", "boxes"),
        weight_dict=ref_weights,
        alpha=0.25,
        gamma=1.0,
        matcher=ref_matcher,
    )


def test_labels_with_softmax_cost_and_a_no_object_logit() -> None:
    out, target = case((3, 0, 5), classes=4, logits=5, seed=5)
    target["num_classes"] = 4
    matcher = {"use_focal_loss": False}
    crit = DetrLoss(losses=["labels", "boxes"], eos_coef=0.2, matcher=matcher)
    ref_matcher = {
        "weight_dict": {"cost_class": 2.0, "cost_bbox": 5.0, "cost_giou": 2.0},
        "alpha": 0.25,
        "gamma": 2.0,
        "use_focal_loss": False,
    }
    compare(crit, out, target, losses=("labels", "boxes"), eos_coef=0.2, matcher=ref_matcher)


def test_vfl_with_every_term_present() -> None:
    out, target = case((7, 1), queries=16, layers=6, seed=11)
    compare(DetrLoss(losses=["boxes", "vfl"]), out, target, losses=("boxes", "vfl"))
