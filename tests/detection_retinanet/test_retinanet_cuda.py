# SPDX-License-Identifier: Apache-2.0
"""On CUDA (skipped elsewhere): no host-device synchronisation in forward and backward, CPU parity."""

from __future__ import annotations

import pytest
import retinanet_cases as tl
import torch

from losskit_detection_retinanet import RetinaNetLoss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _to_cuda(cls, reg, anchors, gt):
    dev = torch.device("cuda")
    return (
        [t.detach().to(dev).requires_grad_() for t in cls],
        [t.detach().to(dev).requires_grad_() for t in reg],
        anchors.to(dev),
        [{k: v.to(dev) for k, v in g.items()} for g in gt],
    )


@pytest.mark.parametrize(
    "cfg",
    [{}, {"box_loss": "giou"}, {"box_loss": "smooth_l1", "normalizer": "batch"}],
    ids=["l1", "giou", "batch"],
)
def test_cuda_no_sync_and_parity(cfg):
    cls, reg, anchors, gt = tl.make_batch([12, 0, 30], image=640, num_classes=80, seed=3)
    crit = RetinaNetLoss(**cfg)
    ref = crit({"cls_logits": cls, "bbox_regression": reg, "anchors": anchors}, {"gt": gt})
    ref.total.backward()
    c, r, a, g = _to_cuda(cls, reg, anchors, gt)
    out = {"cls_logits": c, "bbox_regression": r, "anchors": a}
    crit(out, {"gt": g})  # warm-up: lazy CUDA initialisation may synchronise once
    for t in c + r:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        res = crit(out, {"gt": g})
        res.total.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for k in ref:
        assert tl.rel_diff(res[k].cpu(), ref[k]) <= 1e-5
    assert tl.rel_diff(tl.grads(c).cpu(), tl.grads(cls)) <= 1e-5
    assert tl.rel_diff(tl.grads(r).cpu(), tl.grads(reg)) <= 1e-5
    assert torch.equal(
        crit.match(out, {"gt": g}).cpu(),
        crit.match({"cls_logits": cls, "bbox_regression": reg, "anchors": anchors}, {"gt": gt}),
    )


def test_cuda_half_and_autocast():
    cls, reg, anchors, gt = tl.make_batch([5, 0, 9], seed=6)
    crit = RetinaNetLoss()
    ref = crit({"cls_logits": cls, "bbox_regression": reg, "anchors": anchors}, {"gt": gt})
    c, r, a, g = _to_cuda(cls, reg, anchors, gt)
    for dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cuda", dtype=dtype):
            res = crit(
                {"cls_logits": [t.to(dtype) for t in c], "bbox_regression": r, "anchors": a}, {"gt": g}
            )
        for k in ref:
            assert torch.isfinite(res[k]) and tl.rel_diff(res[k].cpu(), ref[k]) < 1e-2
