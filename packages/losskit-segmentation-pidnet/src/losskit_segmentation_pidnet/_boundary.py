# SPDX-License-Identifier: Apache-2.0
"""PIDNet's class-balanced boundary BCE on full-resolution boundary logits, as one autograd node.

``sum_i w_i * BCE(x_i, t_i) / n_all`` with ``w_i = w_pos`` where ``t_i == 1``, ``w_neg`` where
``t_i == 0`` and 0 elsewhere. The softplus is written ``max(x, 0) + log(1 + exp(-|x|))`` (``log1p``
and ``softplus`` are not vectorised on CPU and cost several times more); the argument of ``log`` lies in
``(1, 2]``, so the absolute error per pixel is one rounding of a number near 1. Backward is the closed
form ``w * (sigmoid(x) - t) / n_all``; only the sigmoid, the positive mask and the weights are kept. The sigmoid computed on the way is returned too (no gradient), as
the boundary-aware CE selects pixels by it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["balanced_bce"]


class _BalancedBCE(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, logits: Tensor, positive: Tensor, weight: Tensor, n_all: Tensor
    ) -> tuple[Tensor, Tensor]:
        prob = torch.sigmoid(logits)
        loss = logits.abs().neg_().exp_().add_(1.0).log_().add_(logits.clamp(min=0.0))  # softplus(x)
        loss.sub_(torch.where(positive, logits, 0.0))  # BCE = softplus(x) - x * t, with t = 1 on positives
        total = torch.dot(loss.reshape(-1), weight.reshape(-1)) / n_all
        ctx.save_for_backward(prob, positive, weight, n_all)
        ctx.mark_non_differentiable(prob)
        return total, prob

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor, _: Tensor | None) -> tuple[Tensor | None, ...]:
        prob, positive, weight, n_all = ctx.saved_tensors
        grad_logits = torch.sub(prob, positive.to(prob.dtype)).mul_(weight).mul_(grad / n_all)
        return grad_logits, None, None, None


def balanced_bce(
    logits: Tensor, positive: Tensor, negative: Tensor, n_pos: Tensor, n_neg: Tensor, n_all: Tensor
) -> tuple[Tensor, Tensor]:
    """Class-balanced BCE of boundary ``logits`` and the boundary probability map.

    Args:
        logits: ``(*)`` boundary logits (floating; the computation runs in this dtype).
        positive, negative: ``(*)`` bool masks of the pixels where the boundary map is 1 / 0 (pixels in
            neither weigh 0).
        n_pos, n_neg: positive / negative pixel counts (0-dim; the caller may average them over ranks).
        n_all: the divisor (0-dim, > 0), the number of pixels.

    Returns:
        ``(loss, prob)``: the scalar ``sum_i w_i * BCE_i / n_all`` with ``w = n_neg / (n_pos + n_neg)`` on
        positives and ``n_pos / (n_pos + n_neg)`` on negatives, and ``sigmoid(logits)`` (no gradient).
    """
    dtype = logits.dtype
    n_sum = n_pos + n_neg
    n_sum = torch.where(n_sum > 0, n_sum, torch.ones_like(n_sum))
    w_pos, w_neg = (n_neg / n_sum).to(dtype), (n_pos / n_sum).to(dtype)
    weight = torch.where(positive, w_pos, torch.where(negative, w_neg, 0.0))
    # The target is 1 on positives, else 0: equal to bd_gt wherever the weight is not 0, always finite.
    loss, prob = _BalancedBCE.apply(logits, positive, weight, n_all.to(dtype))
    return loss, prob
