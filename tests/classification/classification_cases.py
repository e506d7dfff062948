# SPDX-License-Identifier: Apache-2.0
"""Helpers shared by the classification tests (importable by spawned gloo ranks)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def rel_diff(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max(max |b|, tiny), in float64."""
    a64, b64 = a.detach().double(), b.detach().double()
    if a64.numel() == 0:
        return 0.0
    scale = b64.abs().max().clamp_min(1e-30)
    return float((a64 - b64).abs().max() / scale)


def linear_grad(crit: Any, feats: Tensor, weight: Tensor, target: Tensor) -> Tensor:
    """Gradient of ``crit({"pred": feats @ weight}, {"target": target})`` w.r.t. ``weight``."""
    w = weight.detach().clone().requires_grad_()
    loss = crit({"pred": feats @ w}, {"target": target})
    (grad,) = torch.autograd.grad(loss, w)
    return grad


def ddp_worker(rank: int, world_size: int, cases: list[dict[str, Any]]) -> list[Tensor]:
    """For each case: this rank's gradient of a linear model averaged over ranks (DDP-style)."""
    from losskit_classification import CrossEntropy, FocalLoss

    out = []
    for case in cases:
        cls = CrossEntropy if case["criterion"] == "cross_entropy" else FocalLoss
        crit = cls(**case["config"])
        feats, target = case["halves"][rank]
        grad = linear_grad(crit, feats, case["weight"], target)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        out.append(grad / world_size)
    return out
