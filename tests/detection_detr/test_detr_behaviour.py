# SPDX-License-Identifier: Apache-2.0
"""One host transfer per call, fp32 costs under bf16 autocast, float64 gradcheck, training converges,
and the CUDA path (skipped without CUDA)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from detr_cases import case, leaves

import losskit_detection_detr._match as match_module
import losskit_detection_detr.detr as detr_module
from losskit_detection_detr import DetrLoss


def _as(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with every floating model output replaced by a leaf of ``dtype`` (gt boxes kept)."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and value.requires_grad:
            return value.detach().to(dtype).requires_grad_(True)
        return value
    if isinstance(value, dict):
        return {k: _as(v, dtype) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_as(v, dtype) for v in value)
    return value


@pytest.fixture
def solver_calls(monkeypatch: pytest.MonkeyPatch) -> list[torch.dtype]:
    """The dtype of the packed cost at each call of the host solver (one call = one transfer)."""
    calls: list[torch.dtype] = []
    original = detr_module.hungarian

    def counting(packed: torch.Tensor, counts: list[int]) -> torch.Tensor:
        calls.append(packed.dtype)
        return original(packed, counts)

    monkeypatch.setattr(detr_module, "hungarian", counting)
    return calls


def test_one_transfer_per_call_for_all_output_sets(solver_calls: list[torch.dtype]) -> None:
    out, target = case((3, 5, 1), layers=6)  # 6 decoder layers + encoder: 7 matched sets
    solved: list[tuple[int, ...]] = []
    original = match_module._solve

    def spy(packed: Any, counts: list[int]) -> Any:
        solved.append((*packed.shape, *counts))
        return original(packed, counts)

    match_module._solve = spy
    try:
        DetrLoss()(out, target)
    finally:
        match_module._solve = original
    # (S, sum n, Q + validity column) and the gts per image: no padding, no cross-image block
    assert len(solver_calls) == 1 and solved == [(7, 9, 30 + 1, 3, 5, 1)]
    no_gt, target_no_gt = case((0, 0))
    DetrLoss()(no_gt, target_no_gt)
    assert len(solver_calls) == 1  # nothing to match: no transfer at all


def test_bf16_autocast_costs_and_ious_in_fp32(solver_calls: list[torch.dtype]) -> None:
    out, target = case((4, 2), seed=7)
    crit = DetrLoss()
    plain = crit(out, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = crit(out, target)
    for k in plain:
        assert auto[k].dtype == torch.float32
        torch.testing.assert_close(auto[k], plain[k], rtol=0, atol=0)
    half = _as(out, torch.bfloat16)
    rounded = _as(half, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = crit(half, target)
    want = crit(rounded, target)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)
    assert solver_calls == [torch.float32] * 4
    sum(got.values()).backward()
    assert half["pred"].grad is not None and half["pred"].grad.dtype == torch.bfloat16


@pytest.mark.parametrize("losses", [("focal", "boxes"), ("labels", "boxes")])
def test_gradcheck_float64(losses: tuple[str, ...]) -> None:
    logits = 4 if "labels" in losses else 3
    out, target = case((2, 1), queries=3, classes=3, logits=logits, layers=1, num_denoising=2, seed=2)
    target["num_classes"] = 3
    out = _as(out, torch.float64)
    dn = out["dn_aux_pred"][0]
    xs = [out["pred"], dn["pred_logits"], dn["pred_boxes"]]  # the aux set is checked through pred's path
    crit = DetrLoss(losses=list(losses))

    def total(pred: torch.Tensor, dn_logits: torch.Tensor, dn_boxes: torch.Tensor) -> torch.Tensor:
        o = {**out, "pred": pred, "dn_aux_pred": [{"pred_logits": dn_logits, "pred_boxes": dn_boxes}]}
        terms = crit(o, target)
        assert all(v.dtype == torch.float64 for v in terms.values())
        return sum(terms.values())

    assert torch.autograd.gradcheck(total, xs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_training_moves_query_boxes_onto_the_gts() -> None:
    torch.manual_seed(0)
    gt = torch.tensor([[8.0, 8.0, 24.0, 30.0], [30.0, 10.0, 60.0, 26.0], [12.0, 40.0, 40.0, 60.0]])
    target = {"gt": [{"boxes": gt, "labels": torch.tensor([0, 2, 1])}], "img_size": 64}
    box_logits = torch.nn.Parameter(torch.randn(1, 8, 4) * 0.5)
    cls_logits = torch.nn.Parameter(torch.randn(1, 8, 3) * 0.1 - 2.0)
    opt = torch.optim.Adam([box_logits, cls_logits], lr=0.1)
    crit = DetrLoss()
    first = None
    for _ in range(120):
        out = {"pred": torch.cat((box_logits.sigmoid(), cls_logits), dim=-1)}
        terms = crit(out, target)
        loss = sum(terms.values())
        first = float(loss) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = {"pred": torch.cat((box_logits.sigmoid(), cls_logits), dim=-1).detach()}
    ((query, gt_idx),) = crit.match(out, target)["main"]
    want = gt / 64
    want = torch.cat(((want[:, :2] + want[:, 2:]) / 2, want[:, 2:] - want[:, :2]), dim=1)
    torch.testing.assert_close(out["pred"][0, query, :4], want[gt_idx], atol=0.01, rtol=0)
    assert float(loss) < 0.2 * first
    # the matched queries score their gt's class highest
    assert torch.equal(out["pred"][0, query, 4:].argmax(-1), target["gt"][0]["labels"][gt_idx])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_with_one_blocking_transfer() -> None:
    out, target = case((5, 3, 0), layers=6, seed=4)
    crit = DetrLoss()
    cpu = crit(out, target)
    g_cpu = torch.autograd.grad(sum(cpu.values()), leaves(out))
    cuda_out = _as(out, torch.float32)
    cuda_out = {k: v for k, v in cuda_out.items()}
    moved = detr_module._to(cuda_out, "cuda")
    moved_target = detr_module._to(target, "cuda")
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning, match="synchroniz") as record:
            got = crit(moved, moved_target)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    syncs = [w for w in record if "synchroniz" in str(w.message)]
    assert 1 <= len(syncs) <= 2  # the cost read-back (and at most the copy of the matches back)
    for k in cpu:
        torch.testing.assert_close(got[k].cpu(), cpu[k], rtol=1e-4, atol=1e-5)
    g = torch.autograd.grad(sum(got.values()), leaves(moved))
    for a, b in zip(g, g_cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-3, atol=1e-5)
