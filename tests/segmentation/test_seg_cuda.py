# SPDX-License-Identifier: Apache-2.0
"""CUDA only (skipped without a GPU): no host-device sync, parity on the device, autocast."""

from __future__ import annotations

import pytest
import torch
from seg_cases import make_batch, reference

from losskit.testing import no_host_sync
from losskit_segmentation import SegCrossEntropy

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
FIELDS = {"label_smoothing": 0.1, "class_weights": [1.0, 2.0, 0.5]}


@cuda
@pytest.mark.parametrize("size", [(16, 24, 64, 96), (64, 96, 64, 96)], ids=["resized", "equal"])
def test_no_host_sync_and_parity_on_cuda(size):
    pred, labels = make_batch(2, 3, *size, dtype=torch.float32)
    crit = SegCrossEntropy(**FIELDS).cuda()
    x = pred.detach().cuda().requires_grad_()
    y = labels.cuda()
    crit({"pred": x}, {"target": y}).backward()  # warm-up: cached tables, lazy init
    x.grad = None
    with no_host_sync():
        loss = crit({"pred": x}, {"target": y})
        loss.backward()
    want = reference(
        pred.detach().double(),
        labels,
        label_smoothing=0.1,
        class_weights=torch.tensor(FIELDS["class_weights"]),
    )
    torch.testing.assert_close(loss.double().cpu(), want, rtol=1e-5, atol=0)
    assert torch.isfinite(x.grad).all()


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_on_cuda_computes_in_fp32(dtype):
    pred, labels = make_batch(2, 3, 16, 24, 64, 96, dtype=torch.float32)
    crit = SegCrossEntropy(**FIELDS).cuda()
    x, y = pred.detach().cuda().requires_grad_(), labels.cuda()
    want = crit({"pred": x}, {"target": y})
    with torch.autocast("cuda", dtype=dtype):
        got = crit({"pred": x}, {"target": y})
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
