# SPDX-License-Identifier: Apache-2.0
"""upsampled_ce_sum: the weighted sum of per-pixel NLL and log-sum-exp of upsampled logits, against the
formula written with ``F.interpolate`` and ``logsumexp`` (float64), with tiny bands so the batch, row and
column splitting paths run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from losskit_ops import upsampled_ce_sum, upsampled_nll

CASES = [
    # (B, C, h, w, H, W)
    (2, 3, 5, 7, 19, 23),
    (2, 4, 7, 9, 7, 9),  # equal sizes
    (1, 3, 9, 11, 4, 5),  # downsampling: some input rows and columns are read by no band
    (3, 2, 1, 1, 5, 7),
    (2, 5, 6, 8, 50, 300),  # several column bands
]


def _inputs(b, c, h, w, height, width, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = (3.0 * torch.randn(b, c, h, w, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, c, (b, height, width), generator=g)
    a = torch.rand(b, height, width, generator=g, dtype=torch.float64).to(dtype)
    a[torch.rand(b, height, width, generator=g) < 0.2] = 0.0
    lse_w = torch.randn(b, height, width, generator=g, dtype=torch.float64).to(dtype)
    return x, labels, a, lse_w


def _reference(x, labels, a, lse_w, align_corners):
    up = F.interpolate(x, size=labels.shape[-2:], mode="bilinear", align_corners=align_corners)
    lse = up.logsumexp(dim=1)
    nll = lse - up.gather(1, labels[:, None])[:, 0]
    return (a * nll).sum() + (0.0 if lse_w is None else (lse_w * lse).sum())


@pytest.mark.parametrize("with_lse", [False, True])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("band_elements", [None, 40])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_value_and_grad_match_the_formula(case, band_elements, align_corners, with_lse):
    x, labels, a, lse_w = _inputs(*case)
    lse_w = lse_w if with_lse else None
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = upsampled_ce_sum(xa, labels, a, lse_w, align_corners=align_corners, band_elements=band_elements)
    want = _reference(xb, labels, a, lse_w, align_corners)
    (3.0 * got).backward()
    (3.0 * want).backward()  # the incoming gradient scales the precomputed one
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-12, atol=1e-12)


def test_equals_the_weighted_sum_of_upsampled_nll():
    x, labels, a, _ = _inputs(2, 4, 6, 8, 25, 31, dtype=torch.float32)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = upsampled_ce_sum(xa, labels, a, align_corners=False)
    want = (upsampled_nll(xb, labels, a > 0, align_corners=False) * a).sum()
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-7)


def test_no_gradient_needed_gives_the_same_value():
    x, labels, a, lse_w = _inputs(2, 3, 4, 5, 9, 11)
    with torch.no_grad():
        plain = upsampled_ce_sum(x, labels, a, lse_w)
    graded = upsampled_ce_sum(x.clone().requires_grad_(), labels, a, lse_w)
    assert not plain.requires_grad and graded.requires_grad
    assert torch.equal(plain, graded.detach())


def test_gradcheck():
    x, labels, a, lse_w = _inputs(2, 2, 2, 3, 5, 4)
    x.requires_grad_()

    def fn(t):
        return upsampled_ce_sum(t, labels, a, lse_w, align_corners=False, band_elements=12)

    assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)


def test_empty_output_keeps_the_graph():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.zeros(2, 0, 7, dtype=torch.int64)
    value = upsampled_ce_sum(x, labels, labels.double())
    assert value == 0
    value.backward()
    assert x.grad is not None and not bool(x.grad.any())


def test_zero_weights_give_zero_and_zero_gradient():
    x, labels, a, _ = _inputs(2, 3, 4, 5, 9, 11)
    xa = x.clone().requires_grad_()
    value = upsampled_ce_sum(xa, labels, torch.zeros_like(a), torch.zeros_like(a))
    value.backward()
    assert value == 0 and not bool(xa.grad.any())


def test_autocast_does_not_lower_precision():
    x, labels, a, lse_w = _inputs(2, 3, 4, 5, 16, 20, dtype=torch.float32)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = upsampled_ce_sum(xa, labels, a, lse_w, align_corners=False)
        got.backward()
    want = upsampled_ce_sum(xb, labels, a, lse_w, align_corners=False)
    want.backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-6, atol=1e-6)
