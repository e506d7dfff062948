# SPDX-License-Identifier: Apache-2.0
"""Parity with the per-keypoint reference written from the formulas: values, gradients, weights."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from rtmcc_reference import reference_encode, reference_loss

from losskit_pose_rtmcc import RTMCCLoss, rtmcc_loss, simcc_bins, simcc_encode

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def make_batch(
    n: int, k: int, input_size: tuple[int, int], split_ratio: float, *, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and keypoints spread over and around the crop, with visibilities 0, 1, 2."""
    g = torch.Generator().manual_seed(seed)
    wx, wy = simcc_bins(input_size, split_ratio)
    pred = torch.randn(n, k, wx + wy, generator=g, dtype=torch.float64).mul_(2.0).to(dtype)
    size = torch.tensor(input_size, dtype=torch.float64)
    xy = (torch.rand(n, k, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3) * size
    vis = torch.randint(0, 3, (n, k, 1), generator=g).double()
    return pred.requires_grad_(), torch.cat((xy, vis), -1).to(dtype)


CASES: list[dict[str, Any]] = [
    {},
    {"input_size": (24, 32), "sigma": (1.7, 2.2)},  # non-square, small sigma
    {"input_size": (33, 20), "split_ratio": 1.5, "sigma": (2.0, 3.0)},  # non-integer ratio, round(49.5)
    {"input_size": (16, 16), "normalize": True, "sigma": (2.0, 2.0)},
    {"input_size": (16, 24), "label_softmax": False, "sigma": (2.5, 1.5)},
    {"input_size": (16, 24), "label_softmax": False, "normalize": True},
    {"input_size": (20, 12), "use_target_weight": False},
    {"input_size": (20, 12), "use_target_weight": False, "label_softmax": False},
    {"input_size": (20, 12), "visibility_weight": "binary", "beta": 3.0, "label_beta": 0.5},
    {"input_size": (20, 12), "normalizer": "instances_and_keypoints", "mask": (0, 3), "mask_weight": 2.5},
]


def _ids(case: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in case.items()) or "defaults"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_values_gradients_and_weights(case: dict[str, Any], dtype: torch.dtype) -> None:
    size = case.get("input_size", (64, 48))
    n, k = (3, 5) if "input_size" in case else (2, 4)
    cfg = {**case, "input_size": size}
    pred, keypoints = make_batch(n, k, size, cfg.get("split_ratio", 2.0), dtype=dtype, seed=len(_ids(case)))
    keypoints_before = keypoints.clone()
    ours = RTMCCLoss(**cfg)({"pred": pred}, {"keypoints": keypoints})
    ref = reference_loss(pred, keypoints, **cfg)
    tol = TOL[dtype]
    for name in ("x", "y"):
        assert ours[name].dtype == dtype
        torch.testing.assert_close(ours[name], ref[name], rtol=tol, atol=tol * 1e-3)
        (g_ours,) = torch.autograd.grad(ours[name], pred, retain_graph=True)
        (g_ref,) = torch.autograd.grad(ref[name], pred, retain_graph=True)
        torch.testing.assert_close(g_ours, g_ref, rtol=tol, atol=tol * float(g_ref.abs().max()))
    # the weights the loss used are the reference's, exactly
    enc = simcc_encode(
        keypoints,
        input_size=size,
        sigma=cfg.get("sigma", (5.66, 5.66)),
        split_ratio=cfg.get("split_ratio", 2.0),
        visibility_weight=cfg.get("visibility_weight", "raw"),
    )
    _, _, ref_weight, ref_centre = reference_encode(
        keypoints,
        input_size=size,
        sigma=cfg.get("sigma", (5.66, 5.66)),
        split_ratio=cfg.get("split_ratio", 2.0),
        visibility_weight=cfg.get("visibility_weight", "raw"),
    )
    assert np.array_equal(enc.weight.double().numpy(), ref_weight)
    assert np.array_equal(enc.centre.double().numpy(), ref_centre)
    assert float(ours.diagnostics["num_weighted"]) == float((ref["weight"] > 0).sum())
    assert 0 < (ref_weight > 0).sum() < n * k  # the batch mixes labelled and dropped keypoints
    assert torch.equal(keypoints, keypoints_before)


def test_functional_matches_the_criterion() -> None:
    pred, keypoints = make_batch(3, 5, (24, 32), 2.0, dtype=torch.float64, seed=3)
    for normalizer in ("keypoints", "instances_and_keypoints"):
        terms = RTMCCLoss(input_size=(24, 32), normalizer=normalizer)(
            {"pred": pred}, {"keypoints": keypoints}
        )
        total = rtmcc_loss(pred, keypoints, input_size=(24, 32), normalizer=normalizer)
        torch.testing.assert_close(total, terms["x"] + terms["y"], rtol=1e-14, atol=0)


def test_all_keypoints_invisible_give_zero_and_zero_gradients() -> None:
    pred, keypoints = make_batch(3, 4, (16, 16), 2.0, dtype=torch.float32, seed=4)
    keypoints[..., 2] = torch.tensor([0.0, 0.49, -1.0, 0.0]).repeat(3, 1)
    terms = RTMCCLoss(input_size=(16, 16))({"pred": pred}, {"keypoints": keypoints})
    assert float(terms["x"]) == 0.0 and float(terms["y"]) == 0.0
    (terms["x"] + terms["y"]).backward()
    assert pred.grad is not None and torch.equal(pred.grad, torch.zeros_like(pred))
    assert float(terms.diagnostics["num_weighted"]) == 0.0


def _window_edges(bins: int, sigma: float, ratio: float) -> list[float]:
    """Coordinates whose centre is just inside / just outside the 3-sigma window on each side."""
    r = 3 * sigma
    lo, hi = int(np.ceil(-r - 1)), int(np.ceil(bins + r)) - 1
    return [c / ratio for c in (lo - 1, lo, lo + 1, hi - 1, hi, hi + 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_window_edges_boundary_and_half_rounding(dtype: torch.dtype) -> None:
    size, ratio, sigma = (20, 14), 2.0, (1.5, 2.0)
    wx, wy = simcc_bins(size, ratio)
    xs = [
        *_window_edges(wx, sigma[0], ratio),
        0.0,
        size[0],
        size[0] - 0.25,  # on the crop's boundary
        1.25,
        1.75,
        2.25,
        -0.25,
        9.75,  # x * 2 = k + 0.5: half to even
    ]
    ys = [*_window_edges(wy, sigma[1], ratio), 0.0, size[1], 6.25, 6.75, -0.75, 13.75, 3.25, 3.75]
    n = max(len(xs), len(ys))
    kp = torch.zeros(2, n, 3, dtype=torch.float64)
    kp[0, :, 0] = torch.tensor(xs + [5.0] * (n - len(xs)))
    kp[0, :, 1] = 7.0
    kp[1, :, 1] = torch.tensor(ys + [5.0] * (n - len(ys)))
    kp[1, :, 0] = 10.0
    kp[..., 2] = 2.0
    kp = kp.to(dtype)
    g = torch.Generator().manual_seed(5)
    pred = torch.randn(2, n, wx + wy, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    enc = simcc_encode(kp, input_size=size, sigma=sigma, split_ratio=ratio)
    _, _, ref_weight, ref_centre = reference_encode(kp, input_size=size, sigma=sigma, split_ratio=ratio)
    assert np.array_equal(enc.centre.double().numpy(), ref_centre)
    assert np.array_equal(enc.weight.double().numpy(), ref_weight)
    # hand-checked: 1.25 * 2 = 2.5 -> 2, 1.75 * 2 = 3.5 -> 4, -0.25 * 2 = -0.5 -> -0 (half to even)
    centre_x = enc.centre[0, :, 0].tolist()
    assert centre_x[9:14] == [2.0, 4.0, 4.0, -0.0, 20.0]
    # both sides of each window edge: the first and last of each triple of edges are dropped
    assert enc.weight[0, :6].tolist() == [0.0, 2.0, 2.0, 2.0, 2.0, 0.0]
    assert enc.weight[1, :6].tolist() == [0.0, 2.0, 2.0, 2.0, 2.0, 0.0]
    ours = RTMCCLoss(input_size=size, sigma=sigma)({"pred": pred}, {"keypoints": kp})
    ref = reference_loss(pred, kp, input_size=size, sigma=sigma)
    tol = TOL[dtype]
    for name in ("x", "y"):
        torch.testing.assert_close(ours[name], ref[name], rtol=tol, atol=0)


def test_gradcheck_float64() -> None:
    _, keypoints = make_batch(2, 3, (6, 5), 2.0, dtype=torch.float64, seed=6)
    keypoints[..., 2] = 2.0
    pred = torch.randn(2, 3, 22, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    for options in ({}, {"label_softmax": False, "normalize": True}):
        crit = RTMCCLoss(input_size=(6, 5), sigma=(1.0, 1.5), beta=2.0, **options)

        def f(p: torch.Tensor, crit: RTMCCLoss = crit) -> torch.Tensor:
            terms = crit({"pred": p}, {"keypoints": keypoints})
            return terms["x"] + 2.0 * terms["y"]

        assert torch.autograd.gradcheck(f, (pred.clone().requires_grad_(),))


def test_fp32_near_convergence_against_fp64() -> None:
    """A nearly converged head (logits = the label softmax's logits + 0.1 noise): the fp32 value keeps
    ~4 digits (it is a difference of two sums), the fp32 gradient stays as exact as the reference's."""
    size = (64, 48)
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(4, 5, 2, generator=g, dtype=torch.float64) * torch.tensor(size, dtype=torch.float64)
    kp = torch.cat((xy, torch.full((4, 5, 1), 2.0, dtype=torch.float64)), -1)
    t_x, t_y, _, _ = reference_encode(kp, input_size=size)
    labels = torch.cat((torch.from_numpy(t_x), torch.from_numpy(t_y)), -1)
    pred64 = (labels * 10.0 + 0.1 * torch.randn(labels.shape, generator=g, dtype=torch.float64)) / 10.0
    pred64.requires_grad_()
    ref = reference_loss(pred64, kp, input_size=size)
    (g64,) = torch.autograd.grad(ref["x"] + ref["y"], pred64)
    pred32 = pred64.detach().float().requires_grad_()
    ours = RTMCCLoss(input_size=size)({"pred": pred32}, {"keypoints": kp.float()})
    value = ours["x"] + ours["y"]
    (g32,) = torch.autograd.grad(value, pred32)
    assert float(ref["x"] + ref["y"]) < 1e-3  # nearly converged
    torch.testing.assert_close(value.double(), (ref["x"] + ref["y"]).detach(), rtol=2e-4, atol=0)
    assert float((g32.double() - g64).abs().max() / g64.abs().max()) < 2e-5


def test_row_blocks_give_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU blocks of rows (here 3 rows of 32 + 24 bins, the last block shorter) change nothing."""
    import losskit_pose_rtmcc._simcc as simcc

    pred, keypoints = make_batch(3, 5, (16, 12), 2.0, dtype=torch.float64, seed=8)
    crit = RTMCCLoss(input_size=(16, 12), sigma=(2.0, 1.5))

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        terms = crit({"pred": pred}, {"keypoints": keypoints})
        total = terms["x"] + 2.0 * terms["y"]
        (grad,) = torch.autograd.grad(total, pred)
        return total.detach(), grad

    whole = run()
    monkeypatch.setattr(simcc, "CPU_BLOCK", 3 * 32)
    assert len(simcc._blocks(15, 32, pred.device)) == 5 and simcc._blocks(15, 24, pred.device)[-1] == (12, 15)
    blocked = run()
    torch.testing.assert_close(blocked[0], whole[0], rtol=1e-14, atol=0)
    torch.testing.assert_close(blocked[1], whole[1], rtol=1e-14, atol=1e-17)
