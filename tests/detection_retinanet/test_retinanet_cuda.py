# SPDX-License-Identifier: Apache-2.0
"""On CUDA (skipped elsewhere): no host-device synchronisation in forward and backward, CPU parity;
invalid gts and anchors, a crowded image and extreme deltas stay finite without a sync."""

from __future__ import annotations

import pytest
import retinanet_cases as tl
import torch

from losskit.checks import set_value_checks
from losskit.testing import no_host_sync
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
    with no_host_sync():
        res = crit(out, {"gt": g})
        res.total.backward()
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


@pytest.mark.parametrize("box_loss", ["l1", "ciou"])
def test_cuda_invalid_targets_crowded_and_extreme_deltas_finite_without_sync(box_loss):
    """Value checks are off on CUDA by default: invalid inputs get their defined treatment, no sync."""
    cls, reg, anchors, gt = tl.make_batch([300, 0, 7], image=640, num_classes=80, seed=4)
    gt[2]["boxes"][0, 2] = gt[2]["boxes"][0, 0]  # zero width
    gt[2]["labels"][1] = 80  # out of range
    anchors[10, 2] = anchors[10, 0]  # degenerate anchor
    reg[0].data[..., 2:] = -30.0  # size deltas far below the clip
    crit = RetinaNetLoss(box_loss=box_loss)
    c, r, a, g = _to_cuda(cls, reg, anchors, gt)
    out = {"cls_logits": c, "bbox_regression": r, "anchors": a}
    crit(out, {"gt": g})  # warm-up
    for t in c + r:
        t.grad = None
    with no_host_sync():
        res = crit(out, {"gt": g})
        res.total.backward()
    assert all(bool(torch.isfinite(v)) for v in res.values())
    assert all(bool(torch.isfinite(t.grad).all()) for t in c + r)
    assert float(res.diagnostics["invalid_targets"]) == 2.0
    set_value_checks("never")  # the CPU default would reject these inputs
    try:
        cpu = crit({"cls_logits": cls, "bbox_regression": reg, "anchors": anchors}, {"gt": gt})
    finally:
        set_value_checks(None)
    for k in cpu:
        assert tl.rel_diff(res[k].cpu(), cpu[k]) <= 1e-5
