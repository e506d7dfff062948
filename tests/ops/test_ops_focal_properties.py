# SPDX-License-Identifier: Apache-2.0
"""The properties torchvision's own focal-loss tests check, for losskit_ops' focal kernels (our own
cases): equal to BCE at gamma 0 without alpha, the focal/BCE ratio in float64, every reduction against
the elementwise result, half precision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from losskit_ops import sigmoid_focal_loss, sigmoid_focal_loss_indexed


def _logits_and_targets(shape=(64, 7), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 4).to(dtype)
    t = (torch.rand(shape, generator=g) < 0.3).to(dtype)
    return x, t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_gamma_zero_without_alpha_is_bce(dtype, reduction):
    x, t = _logits_and_targets(dtype=dtype)
    xr = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    got = sigmoid_focal_loss(xr, t, alpha=-1, gamma=0, reduction=reduction)
    want = F.binary_cross_entropy_with_logits(xb, t, reduction=reduction)
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-14}
    torch.testing.assert_close(got, want, **tol)
    weights = torch.rand(x.shape, dtype=dtype) if reduction == "none" else torch.ones((), dtype=dtype)
    (g_got,) = torch.autograd.grad((got * weights).sum(), xr)
    (g_want,) = torch.autograd.grad((want * weights).sum(), xb)
    torch.testing.assert_close(g_got, g_want, **tol)


@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 2.0), (0.5, 1.0), (-1.0, 3.0), (0.75, 0.5)])
def test_ratio_to_bce_in_float64(alpha, gamma):
    # loss / BCE = a_t (1 - p_t)^gamma elementwise: easy examples (p_t near 1) are down-weighted most
    x, t = _logits_and_targets(shape=(200, 5), seed=1)
    focal = sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma)
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p = torch.sigmoid(x)
    p_t = p * t + (1 - p) * (1 - t)
    a_t = torch.ones_like(t) if alpha < 0 else alpha * t + (1 - alpha) * (1 - t)
    ratio = focal / bce
    torch.testing.assert_close(
        ratio, a_t * (1 - p_t) ** gamma, rtol=1e-8, atol=0
    )  # torch's BCE loses ~1e-10 on tiny values
    easy, hard = p_t > 0.9, p_t < 0.1
    assert easy.any() and hard.any()
    assert (ratio[easy] / a_t[easy]).max() < (ratio[hard] / a_t[hard]).min()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reductions_against_the_elementwise_loss(dtype):
    x, t = _logits_and_targets(dtype=dtype, seed=2)
    none = sigmoid_focal_loss(x, t, reduction="none")
    assert none.shape == x.shape and none.dtype == dtype
    tol = {"rtol": 1e-6, "atol": 0} if dtype == torch.float32 else {"rtol": 1e-13, "atol": 0}
    torch.testing.assert_close(sigmoid_focal_loss(x, t, reduction="mean"), none.mean(), **tol)
    torch.testing.assert_close(sigmoid_focal_loss(x, t, reduction="sum"), none.sum(), **tol)
    labels = torch.where(t.bool().any(1), t.argmax(1), -1)
    one_hot = torch.zeros_like(t)
    one_hot[labels >= 0, labels[labels >= 0]] = 1
    dense = sigmoid_focal_loss(x, one_hot, reduction="none")
    torch.testing.assert_close(sigmoid_focal_loss_indexed(x, labels, reduction="none"), dense, **tol)
    torch.testing.assert_close(sigmoid_focal_loss_indexed(x, labels, reduction="mean"), dense.mean(), **tol)
    torch.testing.assert_close(sigmoid_focal_loss_indexed(x, labels, reduction="sum"), dense.sum(), **tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_half_precision(dtype, reduction):
    # half inputs: computed in float32 on the rounded values; gradients in the input dtype, finite
    x, t = _logits_and_targets(dtype=torch.float32, seed=3)
    xh, th = x.to(dtype).requires_grad_(), t.to(dtype)
    got = sigmoid_focal_loss(xh, th, alpha=-1, gamma=0, reduction=reduction)
    want = F.binary_cross_entropy_with_logits(xh.detach().float(), th.float(), reduction=reduction)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # fp32: its tiny values are more precise
    got.sum().backward()
    assert xh.grad.dtype == dtype and torch.isfinite(xh.grad).all()
    focal = sigmoid_focal_loss(xh.detach(), th, reduction=reduction)
    ref = sigmoid_focal_loss(xh.detach().float(), th.float(), reduction=reduction)
    torch.testing.assert_close(focal, ref, rtol=1e-6, atol=1e-7)
