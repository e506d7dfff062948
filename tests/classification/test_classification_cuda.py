# SPDX-License-Identifier: Apache-2.0
"""On a CUDA device (skipped elsewhere): parity with the CPU and no host-device sync in the hot path."""

from __future__ import annotations

import pytest
import torch
import torchvision
from classification_cases import rel_diff

from losskit.testing import no_host_sync
from losskit_classification import CrossEntropy, FocalLoss, sigmoid_focal_loss, sigmoid_focal_loss_indexed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_no_sync_in_forward_and_backward():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 10, 5, generator=g).cuda().requires_grad_()
    t = torch.randint(0, 10, (64, 5), generator=g).cuda()
    t[:8] = -100
    labels = torch.randint(-1, 10, (64,), generator=g).cuda()
    criteria = [
        CrossEntropy(label_smoothing=0.1, class_weights=[1.0] * 10).cuda(),
        CrossEntropy(normalize_across_ranks=True),
        FocalLoss(),
        FocalLoss(normalize_across_ranks=True),
    ]
    targets = [
        t if isinstance(c, CrossEntropy) else torch.rand(64, 10, 5, generator=g).cuda() for c in criteria
    ]
    soft = torch.softmax(x.detach(), 1)
    with no_host_sync():
        for crit, target in zip(criteria, targets):
            crit({"pred": x}, {"target": target}).backward()
        FocalLoss()({"pred": x[:, :, 0]}, {"target": labels}).backward()
        CrossEntropy()({"pred": x}, {"target": soft}).backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_focal_matches_torchvision_on_cuda(dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(20000, 80, generator=g) * 3).cuda()
    labels = torch.randint(-1, 80, (20000,), generator=g).cuda()
    dense = torch.zeros(20000, 80, device="cuda")
    rows = torch.nonzero(labels >= 0).squeeze(1)
    dense[rows, labels[rows]] = 1.0
    xr = x.clone().requires_grad_()
    ref = torchvision.ops.sigmoid_focal_loss(xr, dense, reduction="mean")
    (g_ref,) = torch.autograd.grad(ref, xr)
    xd = x.to(dtype).requires_grad_()
    for loss in (sigmoid_focal_loss(xd, dense), sigmoid_focal_loss_indexed(xd, labels, reduction="mean")):
        (gd,) = torch.autograd.grad(loss, xd)
        assert loss.dtype == torch.float32 and gd.dtype == dtype
        tol = (1e-6, 1e-5) if dtype == torch.float32 else (1e-2, 1e-2)
        assert rel_diff(loss, ref) <= tol[0] and rel_diff(gd.float(), g_ref) <= tol[1]


def test_autocast_fp16_on_cuda():
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 8).cuda()
    feats = torch.randn(32, 16, device="cuda")
    labels = torch.randint(0, 8, (32,), device="cuda")
    for crit in (CrossEntropy(), FocalLoss()):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = crit({"pred": model(feats)}, {"target": labels})
        loss.backward()
        ref = crit({"pred": model(feats)}, {"target": labels})
        assert loss.dtype == torch.float32 and rel_diff(loss, ref) <= 1e-2
