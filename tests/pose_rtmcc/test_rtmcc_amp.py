# SPDX-License-Identifier: Apache-2.0
"""Mixed precision: bf16/fp16 logits and autocast are computed in fp32; the CUDA path does not sync."""

from __future__ import annotations

import pytest
import torch
from rtmcc_reference import reference_loss

from losskit_pose_rtmcc import RTMCCLoss, simcc_bins

SIZE = (32, 24)


def batch(seed: int, n: int = 4, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    wx, wy = simcc_bins(SIZE, 2.0)
    pred = torch.randn(n, k, wx + wy, generator=g)
    xy = torch.rand(n, k, 2, generator=g) * torch.tensor(SIZE, dtype=torch.float32)
    return pred, torch.cat((xy, torch.randint(0, 3, (n, k, 1), generator=g).float()), -1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits_are_computed_in_fp32(dtype: torch.dtype) -> None:
    pred, kp = batch(0)
    low = pred.to(dtype).requires_grad_()
    terms = RTMCCLoss(input_size=SIZE)({"pred": low}, {"keypoints": kp})
    assert all(v.dtype == torch.float32 for v in terms.values())
    # equal to the fp32 loss of the rounded logits (the reference, in fp32)
    rounded = low.detach().float().requires_grad_()
    ref = reference_loss(rounded, kp, input_size=SIZE)
    for name in ("x", "y"):
        torch.testing.assert_close(terms[name], ref[name], rtol=1e-5, atol=0)
    (terms["x"] + terms["y"]).backward()
    (ref["x"] + ref["y"]).backward()
    assert low.grad is not None and low.grad.dtype == dtype
    # the same gradient, rounded once to the logits' dtype (one ulp apart at most)
    torch.testing.assert_close(low.grad.float(), rounded.grad.to(dtype).float(), rtol=2**-7, atol=1e-12)


def test_bf16_autocast_keeps_fp32() -> None:
    pred, kp = batch(1)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    head = torch.nn.Linear(8, pred.shape[1] * pred.shape[2])
    crit = RTMCCLoss(input_size=SIZE)

    def run(autocast: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        head.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = head(x).view(pred.shape)
            terms = crit({"pred": logits}, {"keypoints": kp})
            (terms["x"] + terms["y"]).backward()
        return terms, head.weight.grad.clone(), logits

    plain, plain_grad, _ = run(False)
    amp, amp_grad, logits = run(True)
    assert logits.dtype == torch.bfloat16  # the head ran in bf16 ...
    assert all(v.dtype == torch.float32 for v in amp.values())  # ... the loss in fp32
    # the loss of the bf16 logits in fp32 equals the reference in fp32 on the same logits
    ref = reference_loss(logits.detach().float(), kp, input_size=SIZE)
    for name in ("x", "y"):
        torch.testing.assert_close(amp[name], ref[name], rtol=1e-5, atol=0)
        torch.testing.assert_close(amp[name], plain[name], rtol=5e-2, atol=0)  # bf16 rounding of the head
    assert torch.isfinite(amp_grad).all()
    torch.testing.assert_close(amp_grad, plain_grad, rtol=0.1, atol=0.1 * float(plain_grad.abs().max()))


def test_autocast_around_fp32_logits_changes_nothing() -> None:
    pred, kp = batch(3)
    p1, p2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    plain = RTMCCLoss(input_size=SIZE)({"pred": p1}, {"keypoints": kp})
    (plain["x"] + plain["y"]).backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = RTMCCLoss(input_size=SIZE)({"pred": p2}, {"keypoints": kp})
        (inside["x"] + inside["y"]).backward()
    for name in ("x", "y"):
        assert torch.equal(inside[name], plain[name])
    assert torch.equal(p1.grad, p2.grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_without_host_sync() -> None:
    pred, kp = batch(4, n=64, k=17)
    crit = RTMCCLoss(input_size=SIZE, normalizer="instances_and_keypoints", mask=(0, 2), mask_weight=2.0)
    cpu_pred = pred.clone().requires_grad_()
    cpu = crit({"pred": cpu_pred}, {"keypoints": kp})
    (cpu["x"] + cpu["y"]).backward()
    dev = torch.device("cuda")
    gpu_pred = pred.to(dev).requires_grad_()
    gpu_kp = kp.to(dev)
    crit({"pred": gpu_pred}, {"keypoints": gpu_kp})  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        terms = crit({"pred": gpu_pred}, {"keypoints": gpu_kp})
        (terms["x"] + terms["y"]).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for name in ("x", "y"):
        torch.testing.assert_close(terms[name].cpu(), cpu[name], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gpu_pred.grad.cpu(), cpu_pred.grad, rtol=1e-4, atol=1e-7)
