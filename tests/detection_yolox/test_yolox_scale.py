# SPDX-License-Identifier: Apache-2.0
"""Data parallel (gloo, 2 ranks), mixed precision, determinism, no data reads in the hot path, a crowded
image, and (GPU only) no host-device synchronisation."""

from __future__ import annotations

import time

import pytest
import torch
from yolox_cases import ddp_rank, fresh, make_batch, shared_model_grads

from losskit.testing import no_host_sync, run_on_ranks
from losskit_detection_yolox import YOLOXLoss


def test_ddp_gradients_equal_single_process_on_the_whole_batch() -> None:
    # rank 0: two images without boxes; rank 1: two crowded images
    out, target = make_batch(31, batch=4, num_classes=4, img=64, counts=[0, 0, 40, 30], informed=0.8)
    levels = [p.detach() for p in out["pred"]]
    halves = [
        ([p[sl] for p in levels], {"gt": target["gt"][sl], "img_size": 64})
        for sl in (slice(0, 2), slice(2, 4))
    ]
    ranks = run_on_ranks(ddp_rank, world_size=2, args=(halves,))

    assert (
        ranks[0]["keys"]
        == ranks[1]["keys"]
        == (("iou", "obj", "cls", "l1"), ("num_fg", "l1_active", "invalid_targets"))
    )
    assert ranks[0]["num_fg"] == 0 and ranks[1]["num_fg"] > 0

    whole, _ = shared_model_grads(levels, target)
    for r in ranks:  # on: DDP-averaged gradients == one process on the whole batch
        for got, want in zip(r[True], whole):
            assert float((got - want).abs().max()) <= 1e-5
    # off (YOLOX's behaviour): each rank divides by its own count (rank 0 by max(0, 1) = 1), so the
    # averaged gradient is the mean of the per-half gradients, which is not the whole batch's
    per_half = [shared_model_grads(*h)[0] for h in halves]
    for got, a, b in zip(ranks[0][False], per_half[0], per_half[1]):
        torch.testing.assert_close(got, (a + b) / 2, rtol=1e-5, atol=1e-6)
    assert max(float((g - w).abs().max()) for g, w in zip(ranks[0][False], whole)) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype: torch.dtype) -> None:
    out, target = make_batch(12, batch=3, num_classes=6, img=128, gts=(1, 20), informed=0.7)
    crit = YOLOXLoss()
    crit.set_epoch(1)
    low = {"pred": [p.detach().to(dtype).requires_grad_(True) for p in out["pred"]]}
    upcast = {"pred": [p.detach().float().requires_grad_(True) for p in low["pred"]]}
    terms, same = crit(low, target), crit(upcast, target)
    terms.total.backward()
    for name in terms:
        assert terms[name].dtype == torch.float32 and torch.isfinite(terms[name])
        # everything is computed in float32: only the rounding of the inputs differs from float32
        assert torch.equal(terms[name], same[name])
        assert float(terms[name]) == pytest.approx(float(crit(out, target)[name]), rel=0.05, abs=0.02)
    for p in low["pred"]:
        assert p.grad.dtype == dtype and torch.isfinite(p.grad).all()


def test_under_cpu_autocast_bf16_the_result_is_the_float32_one() -> None:
    out, target = make_batch(13, batch=2, num_classes=5, img=128, gts=(1, 20), informed=0.7)
    crit = YOLOXLoss()
    crit.set_epoch(1)
    plain = crit(fresh(out), target)
    auto_out = fresh(out)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = crit(auto_out, target)
        assignment = crit.assign(auto_out, target)
    auto.total.backward()
    for name in plain:
        assert torch.equal(plain[name], auto[name])
    assert torch.equal(assignment.fg_mask, crit.assign(out, target).fg_mask)
    assert all(torch.isfinite(p.grad).all() for p in auto_out["pred"])


def test_bit_identical_across_calls() -> None:
    out, target = make_batch(14, batch=3, num_classes=5, img=128, gts=(0, 40), kind="mixed", duplicates=True)
    crit = YOLOXLoss()
    crit.set_epoch(1)
    first, second = fresh(out), fresh(out)
    a, b = crit(first, target), crit(second, target)
    a.total.backward()
    b.total.backward()
    for name in a:
        assert torch.equal(a[name], b[name])
    for p, q in zip(first["pred"], second["pred"]):
        assert torch.equal(p.grad, q.grad)


def test_forward_and_backward_read_no_tensor_data() -> None:
    """On the meta device (no data at all), the accelerator path runs end to end: nothing reads a value
    back to the host (no ``.item()``, no data-dependent shape)."""
    out, target = make_batch(15, batch=2, num_classes=3, img=64, counts=[4, 0])
    meta_out = {"pred": [p.detach().to("meta").requires_grad_(True) for p in out["pred"]]}
    meta_target = {
        "gt": [{"boxes": g["boxes"].to("meta"), "labels": g["labels"].to("meta")} for g in target["gt"]],
        "img_size": 64,
    }
    crit = YOLOXLoss()  # "auto": static slots off the CPU
    crit.set_epoch(1)
    terms = crit(meta_out, meta_target)
    terms.total.backward()
    assert all(p.grad.shape == p.shape for p in meta_out["pred"])
    assert crit.assign(meta_out, meta_target).fg_mask.shape == (2, 84)
    with pytest.raises(RuntimeError, match="meta"):  # the exact sizing reads one number
        YOLOXLoss(candidate_slots="exact")(meta_out, meta_target)


def test_a_crowded_image_with_500_boxes_runs() -> None:
    out, target = make_batch(16, batch=1, num_classes=80, img=640, counts=[500], informed=0.3)
    crit = YOLOXLoss()
    start = time.perf_counter()
    terms = crit(out, target)
    terms.total.backward()
    elapsed = time.perf_counter() - start
    assert all(torch.isfinite(t) for t in terms.values())
    assert float(terms.diagnostics["num_fg"]) >= 200
    assert elapsed < 30.0


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_no_host_device_sync_on_cuda() -> None:
    out, target = make_batch(17, batch=4, num_classes=80, img=320, gts=(0, 50), informed=0.5)
    dev_out = {"pred": [p.detach().cuda().requires_grad_(True) for p in out["pred"]]}
    dev_target = {
        "gt": [{"boxes": g["boxes"].cuda(), "labels": g["labels"].cuda()} for g in target["gt"]],
        "img_size": 320,
    }
    crit = YOLOXLoss()
    crit.set_epoch(1)
    crit(dev_out, dev_target)  # warm-up
    with no_host_sync():
        terms = crit(fresh(dev_out), dev_target)
        terms.total.backward()
    cpu = crit(out, target)
    for name in cpu:
        assert float(terms[name]) == pytest.approx(float(cpu[name]), rel=1e-4, abs=1e-5)
