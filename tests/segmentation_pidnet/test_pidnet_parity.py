# SPDX-License-Identifier: Apache-2.0
"""pidnet_loss equals the issue's formula term by term (float64), and the banded NLL equals F.cross_entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pidnet_cases import IGNORE, grads, make_batch, reference_terms

from losskit_ops import resize2d
from losskit_segmentation_pidnet import PIDNetLoss, pidnet_loss, upsampled_nll
from losskit_segmentation_pidnet._boundary import balanced_bce

SIZES = [
    # B, C, h, w, H, W
    (2, 5, 7, 9, 29, 41),
    (2, 3, 63, 94, 500, 750),  # not divisible: labels 500x750, logits 63x94
    (1, 4, 8, 8, 8, 8),  # same size: resizing is the identity
    (3, 2, 1, 1, 5, 7),  # a single logit pixel
    (2, 3, 5, 6, 3, 4),  # labels smaller than logits
]


def _compare(out, target, ref_kwargs, loss_kwargs, rel=1e-5, grad_tol=1e-4):
    inputs = [out["pred"], out["extra_p"], out["extra_d"]]
    ref = reference_terms(
        out["pred"], out["extra_p"], out["extra_d"], target["target"], target["bd_gt"], **ref_kwargs
    )
    got = pidnet_loss(
        out["pred"], out["extra_p"], out["extra_d"], target["target"], target["bd_gt"], **loss_kwargs
    )
    assert list(got) == ["ce", "boundary", "boundary_ce"]
    worst = {}
    for name in got:
        assert torch.isfinite(ref[name]), name
        err = ((got[name] - ref[name]).abs() / ref[name].abs().clamp(min=1e-12)).detach()
        assert err <= rel, (name, float(err))
        g_got, g_ref = grads(got[name], inputs), grads(ref[name], inputs)
        gerr = max(float((a - b).abs().max()) for a, b in zip(g_got, g_ref))
        assert gerr <= grad_tol, (name, gerr)
        worst[name] = (float(err), gerr)
    return worst


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_terms_match_formula_float64(size):
    out, target = make_batch(*size, seed=sum(size))
    _compare(out, target, {}, {})


@pytest.mark.parametrize("align_corners", [True, False])
def test_align_corners_and_class_weights(align_corners):
    out, target = make_batch(2, 4, 6, 7, 23, 30, seed=3)
    cw = torch.tensor([0.5, 2.0, 1.0, 0.25], dtype=torch.float64)
    _compare(
        out,
        target,
        {"class_weights": cw, "align_corners": align_corners},
        {"class_weights": tuple(cw.tolist()), "align_corners": align_corners},
    )


def test_non_default_weights_and_threshold():
    out, target = make_batch(2, 3, 5, 5, 17, 19, seed=5, d_scale=1.0)
    kw = {
        "balance_weights": (0.7, 0.3),
        "boundary_weight": 5.0,
        "boundary_ce_weight": 2.5,
        "boundary_threshold": 0.55,
    }
    ref_kw = dict(kw)
    _compare(out, target, ref_kw, kw)


@pytest.mark.parametrize("kind", ["bool", "uint8", "int64", "float32", "float64"])
def test_bd_gt_dtypes(kind):
    out, target = make_batch(2, 3, 5, 6, 20, 24, seed=11)
    dtype = getattr(torch, kind)
    bd = target["bd_gt"].to(dtype)
    got = pidnet_loss(out["pred"], out["extra_p"], out["extra_d"], target["target"], bd)
    ref = reference_terms(out["pred"], out["extra_p"], out["extra_d"], target["target"], target["bd_gt"])
    for name in got:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=0)


def test_criterion_float32_matches_float64_reference():
    out, target = make_batch(2, 19, 16, 32, 128, 256, seed=2, dtype=torch.float32)
    got = PIDNetLoss()(out, target)
    ref = reference_terms(out["pred"], out["extra_p"], out["extra_d"], target["target"], target["bd_gt"])
    for name in got:
        torch.testing.assert_close(got[name].double(), ref[name], rtol=1e-5, atol=1e-6)


def test_diagnostics_are_the_branch_parts():
    out, target = make_batch(2, 4, 6, 6, 21, 22, seed=4)
    got = pidnet_loss(out["pred"], out["extra_p"], out["extra_d"], target["target"], target["bd_gt"])
    d = got.diagnostics
    torch.testing.assert_close(got["ce"].float(), 0.4 * d["ce_p"] + 1.0 * d["ce_i"])
    labels = target["target"]
    assert d["valid_pixels"] == (labels != IGNORE).sum()
    assert d["ce_i_pixels"] == d["valid_pixels"]
    up_d = F.interpolate(
        out["extra_d"].detach(), size=labels.shape[-2:], mode="bilinear", align_corners=True
    )[:, 0]
    assert d["boundary_ce_pixels"] == ((torch.sigmoid(up_d) > 0.8) & (labels != IGNORE)).sum()
    assert all(v.dtype == torch.float32 and not v.requires_grad for v in d.values())


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("band", [7, 64, None])
@pytest.mark.parametrize(("low", "high"), [((5, 6), (13, 17)), ((9, 6), (4, 5))], ids=["up", "down"])
def test_upsampled_nll_matches_cross_entropy(align_corners, band, low, high):
    # Small bands exercise the batch split (fewer images per band than B), row bands, and (down) input
    # rows that no band reads.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, *low, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, 4, (3, *high), generator=g)
    valid = torch.rand(3, *high, generator=g) > 0.2
    got = upsampled_nll(x, labels, valid, align_corners=align_corners, band_elements=band)
    up = F.interpolate(x, size=high, mode="bilinear", align_corners=align_corners)
    ref = torch.where(valid, F.cross_entropy(up, labels, reduction="none"), 0.0)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    weight = torch.rand(3, *high, dtype=torch.float64, generator=g)
    (g_got,) = torch.autograd.grad((got * weight).sum(), x)
    (g_ref,) = torch.autograd.grad((ref * weight).sum(), x)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-10, atol=1e-12)


def test_upsampled_nll_gradcheck():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, 3, (2, 7, 5), generator=g)
    valid = torch.rand(2, 7, 5, generator=g) > 0.3
    assert torch.autograd.gradcheck(lambda t: upsampled_nll(t, labels, valid, band_elements=20), (x,))


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize(
    ("low", "high"),
    [((5, 6), (13, 600)), ((63, 94), (500, 750)), ((9, 7), (4, 3)), ((4, 4), (4, 9)), ((1, 1), (3, 3))],
    ids=["up", "non-divisible", "down", "width-only", "single-pixel"],
)
def test_resize2d_backward_is_the_adjoint(align_corners, low, high):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 2, *low, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(2, 2, *high, dtype=torch.float64, generator=g)
    got = resize2d(x, high, align_corners=align_corners, band_elements=3 * 2 * 2 * high[1])
    ref = F.interpolate(x, size=high, mode="bilinear", align_corners=align_corners)
    assert torch.equal(got, ref)
    (g_got,) = torch.autograd.grad((got * weight).sum(), x)
    (g_ref,) = torch.autograd.grad((ref * weight).sum(), x)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-12, atol=1e-12)


def test_resize2d_gradcheck():
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: resize2d(t, (7, 9), align_corners=True, band_elements=2 * 2 * 9), (x,)
    )


def test_balanced_bce_float32_matches_torch():
    # softplus as max(x, 0) + log(1 + exp(-|x|)): float32 within rounding of torch's BCE, large logits too.
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 1, 64, 96, generator=g) * torch.tensor([1.0, 30.0]).view(2, 1, 1, 1)).requires_grad_()
    bd = torch.rand(2, 1, 64, 96, generator=g) < 0.1
    n_pos, n_neg = bd.sum().float(), (~bd).sum().float()
    n_all = torch.tensor(float(bd.numel()))
    loss, prob = balanced_bce(x, bd, ~bd, n_pos, n_neg, n_all)
    weight = torch.where(bd, n_neg / (n_pos + n_neg), n_pos / (n_pos + n_neg))
    ref = F.binary_cross_entropy_with_logits(x, bd.float(), weight=weight)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(prob, torch.sigmoid(x.detach()))
    (g_got,) = torch.autograd.grad(loss, x)
    (g_ref,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-12)
