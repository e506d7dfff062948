# SPDX-License-Identifier: Apache-2.0
"""The Charbonnier loss, a differentiable robust L1: ``sqrt((pred - target)^2 + eps^2)``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

import losskit
from losskit.checks import fmt_shape, get_tensor


def charbonnier_loss(
    pred: Tensor, target: Tensor, eps: float = 1e-3, reduction: Literal["mean", "sum"] = "mean"
) -> Tensor:
    """Charbonnier loss of ``pred`` against ``target`` (same shape), reduced by mean or sum.

    Raises:
        losskit.ConfigError: ``reduction`` is not ``"mean"`` or ``"sum"``.
    """
    if reduction not in ("mean", "sum"):
        raise losskit.ConfigError(f"charbonnier_loss: reduction must be 'mean' or 'sum', got {reduction!r}")
    loss = torch.sqrt((pred - target).square() + eps * eps)
    return loss.mean() if reduction == "mean" else loss.sum()


class CharbonnierLoss(losskit.Criterion):
    """Charbonnier (robust L1) loss between a prediction and a target of the same shape.

    Reference: Charbonnier et al., "Two deterministic half-quadratic regularization algorithms", 1994.
    """

    name = "charbonnier_loss"
    inputs = {"pred": "(N, *) float prediction"}
    targets = {"target": "(N, *) float target, same shape as pred"}

    @dataclass(frozen=True)
    class Config:
        eps: float = losskit.option(1e-3, gt=0.0, doc="Smoothing constant; the loss is ~|x| for |x| >> eps.")
        reduction: Literal["mean", "sum"] = losskit.option("mean", doc="Reduction over elements.")

    def forward(self, out: Any, target: Any) -> Tensor:
        pred = get_tensor(
            out, "pred", criterion=self.name, side="out", expected="(N, *) float", float_only=True
        )
        tgt = get_tensor(target, "target", criterion=self.name, side="target", expected="same shape as pred")
        if tgt.shape != pred.shape:
            raise losskit.InputError(
                self.name,
                "target['target']",
                f"expected shape {fmt_shape(pred.shape)} like out['pred'], got {fmt_shape(tgt.shape)}",
            )
        return charbonnier_loss(pred, tgt, self.config.eps, self.config.reduction)

    def example(
        self, batch_size: int = 2, *, device: Any = None, generator: torch.Generator | None = None
    ) -> Any:
        pred = torch.randn(batch_size, 3, 8, 8, generator=generator).to(device).requires_grad_()
        target = torch.randn(batch_size, 3, 8, 8, generator=generator).to(device)
        return {"pred": pred}, {"target": target}
