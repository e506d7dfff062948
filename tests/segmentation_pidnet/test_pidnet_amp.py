# SPDX-License-Identifier: Apache-2.0
"""Mixed precision: fp16/bf16 inputs and autocast run in fp32 inside; the CUDA path does not sync."""

from __future__ import annotations

import pytest
import torch
from pidnet_cases import make_batch

from losskit.testing import no_host_sync
from losskit_segmentation_pidnet import PIDNetLoss


def _fp32(out):
    return {k: v.detach().float().requires_grad_() for k, v in out.items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    out, target = make_batch(2, 5, 8, 12, 32, 48, dtype=torch.float32, seed=1)
    low = {k: v.detach().to(dtype).requires_grad_() for k, v in out.items()}
    got = PIDNetLoss()(low, target)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in got.values())
    # Computed in fp32: equal to the fp32 loss of the rounded inputs ...
    rounded = PIDNetLoss()(_fp32(low), target)
    for name in got:
        torch.testing.assert_close(got[name], rounded[name], rtol=1e-6, atol=1e-7)
    # ... and within the input rounding of the fp32 loss (documented: 5e-2 relative on the total).
    full = PIDNetLoss()(out, target)
    torch.testing.assert_close(got.total, full.total, rtol=5e-2, atol=0)
    got.total.backward()
    assert all(v.grad.dtype == dtype and torch.isfinite(v.grad.float()).all() for v in low.values())


def test_autocast_does_not_lower_internal_precision():
    out, target = make_batch(2, 5, 8, 12, 32, 48, dtype=torch.float32, seed=2)
    plain = PIDNetLoss()(out, target)
    plain_grads = torch.autograd.grad(plain.total, list(out.values()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = PIDNetLoss()(out, target)
        inside_grads = torch.autograd.grad(inside.total, list(out.values()))  # backward inside autocast too
    for name in plain:
        torch.testing.assert_close(inside[name], plain[name], rtol=1e-6, atol=1e-7)
    for a, b in zip(inside_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_autocast_model_outputs():
    torch.manual_seed(0)
    _, target = make_batch(2, 4, 8, 12, 32, 48, dtype=torch.float32, seed=3)
    head = torch.nn.Conv2d(3, 9, 1)
    x = torch.randn(2, 3, 8, 12)

    def heads(y):
        return {"pred": y[:, :4], "extra_p": y[:, 4:8], "extra_d": y[:, 8:]}

    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = head(x)
        assert y.dtype == torch.bfloat16
        terms = PIDNetLoss()(heads(y), target)
    terms.total.backward()
    assert torch.isfinite(head.weight.grad).all()
    ref = PIDNetLoss()(heads(head(x)), target)
    torch.testing.assert_close(terms.total, ref.total, rtol=5e-2, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("ohem", [False, True])
def test_cuda_no_host_sync(ohem):
    out, target = make_batch(2, 19, 16, 32, 128, 256, dtype=torch.float32, seed=4)
    crit = PIDNetLoss(ohem=ohem, ohem_min_kept=5000, class_weights=[1.0] * 19)
    cpu = crit(out, target)
    dev = torch.device("cuda")
    out_d = {k: v.detach().to(dev).requires_grad_() for k, v in out.items()}
    target_d = {k: v.to(dev) for k, v in target.items()}
    crit = crit.to(dev)
    crit(out_d, target_d).total.backward()  # warm-up: cached interpolation matrices
    with no_host_sync():
        terms = crit(out_d, target_d)
        terms.total.backward()
    for name in cpu:
        torch.testing.assert_close(terms[name].cpu(), cpu[name], rtol=1e-4, atol=1e-5)
