# SPDX-License-Identifier: Apache-2.0
"""yolofastest_loss: data parallel (gloo, 2 ranks) with the global normaliser, mixed precision (bf16
autocast, half inputs), float64 gradcheck, no data reads in the hot path (meta device) and, on a GPU,
no host-device synchronisation."""

from __future__ import annotations

import pytest
import torch
from yolofastest_cases import V2_ANCHORS, ddp_rank, fresh, make_batch, shared_model_grads

from losskit.testing import no_host_sync, run_on_ranks
from losskit_detection_yolox import YOLOFastestLoss


def test_ddp_with_the_global_normaliser_equals_one_process_on_the_whole_batch() -> None:
    # rank 0: two images without boxes; rank 1: two crowded images
    out, target = make_batch(31, batch=4, num_classes=4, img=128, counts=[0, 0, 40, 30], informed=0.8)
    levels = [p.detach() for p in out["pred"]]
    halves = [
        ([p[sl] for p in levels], {"gt": target["gt"][sl], "img_size": 128})
        for sl in (slice(0, 2), slice(2, 4))
    ]
    ranks = run_on_ranks(ddp_rank, world_size=2, args=(halves,))

    assert ranks[0]["keys"] == ranks[1]["keys"] == (("iou", "obj", "cls"), ("num_fg", "invalid_targets"))
    assert ranks[0]["num_fg"] == 0 and ranks[1]["num_fg"] > 0
    whole, _ = shared_model_grads(levels, target)
    for r in ranks:  # on: the DDP-averaged gradient is the single-process gradient of the whole batch
        for got, want in zip(r[True], whole):
            assert float((got - want).abs().max()) <= 1e-5
    # off (NetsPresso's behaviour): each rank divides by its own count, so the averaged gradient is the
    # mean of the per-half gradients, which is not the whole batch's
    per_half = [shared_model_grads(*h)[0] for h in halves]
    for got, a, b in zip(ranks[0][False], per_half[0], per_half[1]):
        torch.testing.assert_close(got, (a + b) / 2, rtol=1e-5, atol=1e-6)
    assert max(float((g - w).abs().max()) for g, w in zip(ranks[0][False], whole)) > 1e-3


def test_under_cpu_autocast_bf16_the_result_is_the_float32_one() -> None:
    out, target = make_batch(13, batch=2, num_classes=5, img=192, gts=(1, 20), informed=0.7)
    crit = YOLOFastestLoss(anchors=V2_ANCHORS)
    plain_out, auto_out = fresh(out), fresh(out)
    plain = crit(plain_out, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = crit(auto_out, target)
        assignment = crit.assign(auto_out, target)
    for name in plain:
        assert auto[name].dtype == torch.float32 and torch.equal(plain[name], auto[name])
    assert torch.equal(assignment.fg_mask, crit.assign(out, target).fg_mask)
    sum(plain.values()).backward()
    sum(auto.values()).backward()
    for p, q in zip(plain_out["pred"], auto_out["pred"]):
        assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype: torch.dtype) -> None:
    out, target = make_batch(12, batch=2, num_classes=6, img=192, gts=(1, 20), informed=0.7)
    crit = YOLOFastestLoss(anchors=V2_ANCHORS)
    low = {"pred": [p.detach().to(dtype).requires_grad_(True) for p in out["pred"]]}
    upcast = {"pred": [p.detach().float() for p in low["pred"]]}
    terms, same = crit(low, target), crit(upcast, target)
    sum(terms.values()).backward()
    for name in terms:
        # everything is computed in float32: only the rounding of the inputs differs
        assert terms[name].dtype == torch.float32 and torch.equal(terms[name], same[name])
    for p in low["pred"]:
        assert p.grad.dtype == dtype and torch.isfinite(p.grad).all()


def test_gradcheck_float64() -> None:
    # the class target (IoU) is a stop-gradient, as in NetsPresso: check iou + obj, and cls alone
    anchors = ((20.0, 20.0, 40.0, 30.0), (50.0, 60.0))  # 2 anchors on 2 x 2 cells, 1 on one cell
    out, target = make_batch(7, batch=1, num_classes=2, img=32, anchors=anchors, counts=[2], informed=1.0)
    crit = YOLOFastestLoss(anchors=anchors)
    levels = [p.detach().double().requires_grad_(True) for p in out["pred"]]
    assert float(crit({"pred": levels}, target).diagnostics["num_fg"]) > 0

    def box_obj(*ps: torch.Tensor) -> torch.Tensor:
        terms = crit({"pred": list(ps)}, target)
        return terms["iou"] + terms["obj"]

    assert torch.autograd.gradcheck(box_obj, tuple(levels), eps=1e-6, atol=1e-5, fast_mode=True)
    regs = [p.detach()[:, :, :4] for p in levels]
    rest = [p.detach()[:, :, 4:].requires_grad_(True) for p in levels]

    def cls(*ps: torch.Tensor) -> torch.Tensor:
        return crit({"pred": [torch.cat((r, p), 2) for r, p in zip(regs, ps)]}, target)["cls"]

    assert torch.autograd.gradcheck(cls, tuple(rest), eps=1e-6, atol=1e-5, fast_mode=True)


def test_forward_and_backward_read_no_tensor_data() -> None:
    """On the meta device (no data at all) the accelerator path runs end to end: no host reads."""
    out, target = make_batch(15, batch=2, num_classes=3, img=64, counts=[4, 0])
    meta_out = {"pred": [p.detach().to("meta").requires_grad_(True) for p in out["pred"]]}
    meta_target = {
        "gt": [{"boxes": g["boxes"].to("meta"), "labels": g["labels"].to("meta")} for g in target["gt"]],
        "img_size": 64,
    }
    crit = YOLOFastestLoss(anchors=V2_ANCHORS)  # "auto": static slots off the CPU
    terms = crit(meta_out, meta_target)
    sum(terms.values()).backward()
    assert all(p.grad.shape == p.shape for p in meta_out["pred"])
    assert crit.assign(meta_out, meta_target).fg_mask.shape == (2, 3 * (16 + 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_device_sync_on_cuda() -> None:
    out, target = make_batch(17, batch=8, num_classes=80, img=352, gts=(0, 50), informed=0.5)
    dev_out = {"pred": [p.detach().cuda().requires_grad_(True) for p in out["pred"]]}
    dev_target = {
        "gt": [{"boxes": g["boxes"].cuda(), "labels": g["labels"].cuda()} for g in target["gt"]],
        "img_size": 352,
    }
    crit = YOLOFastestLoss(anchors=V2_ANCHORS)
    crit(dev_out, dev_target)  # warm-up
    torch.cuda.synchronize()
    with no_host_sync():
        terms = crit(fresh(dev_out), dev_target)
        sum(terms.values()).backward()
    cpu = crit(out, target)
    for name in cpu:
        assert float(terms[name]) == pytest.approx(float(cpu[name]), rel=1e-4, abs=1e-5)
