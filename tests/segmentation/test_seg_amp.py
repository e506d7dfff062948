# SPDX-License-Identifier: Apache-2.0
"""fp16/bf16 logits and autocast: the loss is computed in fp32."""

from __future__ import annotations

import pytest
import torch
from seg_cases import make_batch

from losskit_segmentation import seg_cross_entropy

FIELDS = {"label_smoothing": 0.1, "class_weights": [1.0, 2.0, 0.5]}


@pytest.mark.parametrize("size", [(4, 5, 12, 15), (12, 15, 12, 15)], ids=["resized", "equal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_logits_are_computed_in_fp32(dtype, size):
    pred, labels = make_batch(2, 3, *size, dtype=torch.float32)
    half = pred.detach().to(dtype).requires_grad_()
    loss = seg_cross_entropy(half, labels, **FIELDS)
    assert loss.dtype == torch.float32
    loss.backward()
    assert half.grad.dtype == dtype
    # the same (rounded) values given in fp32: equal to fp32 rounding, so the computation is fp32
    rounded = half.detach().float().requires_grad_()
    want = seg_cross_entropy(rounded, labels, **FIELDS)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(half.grad.float(), rounded.grad.to(dtype).float(), rtol=0, atol=0)


def test_autocast_region_changes_nothing():
    pred, labels = make_batch(2, 3, 4, 5, 12, 15, dtype=torch.float32)
    want = seg_cross_entropy(pred, labels, **FIELDS)
    (want_grad,) = torch.autograd.grad(want, pred)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = seg_cross_entropy(pred, labels, **FIELDS)
        (grad,) = torch.autograd.grad(got, pred)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=1e-9)
