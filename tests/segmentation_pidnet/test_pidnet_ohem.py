# SPDX-License-Identifier: Apache-2.0
"""OHEM semantics of pidnet_loss (PIDNet's OhemCrossEntropy), on inputs checkable by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pidnet_cases import IGNORE, make_batch

from losskit_segmentation_pidnet import pidnet_loss
from losskit_segmentation_pidnet._ohem import ohem_mask

PROBS = [0.1, 0.3, 0.5, 0.7, 0.95, 0.99]


def _row(probs, labels=None, d=10.0):
    """1x6 logits (the resize is the identity): class-1 probability ``probs``, labels 1, P branch uniform."""
    p = torch.tensor(probs, dtype=torch.float64)
    pred = torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))])[None, :, None, :].requires_grad_()
    extra_p = torch.zeros_like(pred, requires_grad=True)
    extra_d = torch.full((1, 1, 1, len(probs)), d, dtype=torch.float64, requires_grad=True)
    target = torch.ones(1, 1, len(probs), dtype=torch.int64) if labels is None else torch.tensor([[labels]])
    return pred, extra_p, extra_d, target, torch.zeros(1, 1, len(probs))


def _mean_nll(probs, weight=1.0):
    return sum(-weight * math.log(p) for p in probs) / len(probs)


@pytest.mark.parametrize(
    ("thresh", "min_kept", "kept"),
    [
        (0.9, 2, [0.1, 0.3, 0.5, 0.7]),  # threshold regime: every pixel below 0.9
        (0.2, 3, [0.1, 0.3, 0.5]),  # min_kept regime: below the 4th smallest probability (0.7)
        (0.2, 10, [0.1, 0.3, 0.5, 0.7, 0.95]),  # fewer pixels than min_kept: below the largest
        (1.0, 1, PROBS),  # thresh 1 keeps everything
    ],
)
def test_hand_checked_regimes(thresh, min_kept, kept):
    got = pidnet_loss(*_row(PROBS), ohem=True, ohem_thresh=thresh, ohem_min_kept=min_kept)
    assert got.diagnostics["ce_i_pixels"] == len(kept)
    torch.testing.assert_close(
        got.diagnostics["ce_i"].double(), torch.tensor(_mean_nll(kept), dtype=torch.float64)
    )
    # The P branch keeps the plain CE (upstream applies OHEM to the last output only): log 2 per pixel.
    torch.testing.assert_close(
        got.diagnostics["ce_p"].double(), torch.tensor(math.log(2.0), dtype=torch.float64)
    )
    torch.testing.assert_close(
        got["ce"], torch.tensor(0.4 * math.log(2.0) + _mean_nll(kept), dtype=torch.float64)
    )
    # boundary_ce: OHEM over the pixels past the boundary threshold (all of them here).
    torch.testing.assert_close(got["boundary_ce"], torch.tensor(_mean_nll(kept), dtype=torch.float64))


def test_ignored_pixels_are_not_candidates():
    labels = [IGNORE, 1, 1, 1, 1, 1]
    got = pidnet_loss(*_row(PROBS, labels), ohem=True, ohem_thresh=0.2, ohem_min_kept=1)
    # candidates 0.3 .. 0.99; rank 1 is 0.5; keep below max(0.5, 0.2): only 0.3
    assert got.diagnostics["ce_i_pixels"] == 1
    torch.testing.assert_close(got["boundary_ce"], torch.tensor(-math.log(0.3), dtype=torch.float64))


def test_class_weighted_ohem_divides_by_count():
    got = pidnet_loss(*_row(PROBS), ohem=True, ohem_thresh=0.9, ohem_min_kept=2, class_weights=(1.0, 2.0))
    torch.testing.assert_close(
        got.diagnostics["ce_i"].double(), torch.tensor(_mean_nll(PROBS[:4], 2.0), dtype=torch.float64)
    )


def test_no_boundary_pixel_with_ohem():
    got = pidnet_loss(*_row(PROBS, d=-10.0), ohem=True)
    assert got["boundary_ce"] == 0 and got.diagnostics["boundary_ce_pixels"] == 0
    got.total.backward()


def test_mask_regimes_directly():
    prob = torch.tensor([0.5, 0.1, 0.9, 0.3])
    everything = torch.ones(4, dtype=torch.bool)
    assert ohem_mask(prob, everything, thresh=0.6, min_kept=1).tolist() == [True, True, False, True]
    assert ohem_mask(prob, everything, thresh=0.0, min_kept=2).tolist() == [False, True, False, True]
    assert not ohem_mask(prob, torch.zeros(4, dtype=torch.bool), thresh=0.6, min_kept=1).any()
    assert ohem_mask(torch.empty(0), torch.empty(0, dtype=torch.bool), thresh=0.6, min_kept=1).numel() == 0


def _sorted_ohem(score, labels, thresh, min_kept):
    """Upstream semantics with a sort and Python indices (what the device-side version replaces)."""
    pixel = F.cross_entropy(score, labels, ignore_index=IGNORE, reduction="none").reshape(-1)
    mask = labels.reshape(-1) != IGNORE
    prob = torch.exp(-pixel)[mask]
    if prob.numel() == 0:
        return torch.zeros((), dtype=score.dtype)
    ordered, _ = prob.sort()
    threshold = max(float(ordered[min(min_kept, prob.numel() - 1)].detach()), thresh)
    return pixel[mask][prob < threshold].mean()


@pytest.mark.parametrize("min_kept", [5, 300, 2000, 100000])
def test_matches_sort_based_reference(min_kept):
    out, target = make_batch(2, 4, 6, 7, 30, 40, seed=min_kept, d_scale=3.0)
    got = pidnet_loss(
        out["pred"],
        out["extra_p"],
        out["extra_d"],
        target["target"],
        target["bd_gt"],
        ohem=True,
        ohem_thresh=0.3,
        ohem_min_kept=min_kept,
    )
    size = target["target"].shape[-2:]
    i = F.interpolate(out["pred"], size=size, mode="bilinear", align_corners=True)
    d = F.interpolate(out["extra_d"], size=size, mode="bilinear", align_corners=True)[:, 0]
    bd_label = torch.where(torch.sigmoid(d) > 0.8, target["target"], IGNORE)
    torch.testing.assert_close(
        got.diagnostics["ce_i"].double(),
        _sorted_ohem(i, target["target"], 0.3, min_kept).detach(),
        rtol=1e-6,
        atol=0,
    )
    torch.testing.assert_close(
        got["boundary_ce"], _sorted_ohem(i, bd_label, 0.3, min_kept), rtol=1e-10, atol=0
    )
