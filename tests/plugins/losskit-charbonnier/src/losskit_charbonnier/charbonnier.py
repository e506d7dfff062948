# SPDX-License-Identifier: Apache-2.0
"""The Charbonnier loss, a differentiable robust L1: ``sqrt((pred - target)^2 + eps^2)``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

import losskit
from losskit.checks import check_same_device, fmt_shape, get_tensor


@dataclass(frozen=True)
class CharbonnierLossConfig:
    """The fields of ``charbonnier_loss``: the only place their defaults are written."""

    eps: float = losskit.option(1e-3, gt=0.0, doc="Smoothing constant; the loss is ~|x| for |x| >> eps.")
    reduction: Literal["mean", "sum"] = losskit.option("mean", doc="Reduction over elements.")


def charbonnier_loss(
    pred: Tensor,
    target: Tensor,
    eps: float = CharbonnierLossConfig.eps,
    reduction: Literal["mean", "sum"] = CharbonnierLossConfig.reduction,
) -> Tensor:
    """Charbonnier loss of ``pred`` against ``target`` (same shape), reduced by mean or sum.

    The mean of no element is 0 (not NaN), so an empty batch still trains.

    Raises:
        losskit.ConfigError: ``reduction`` is not ``"mean"`` or ``"sum"``.
    """
    if reduction not in ("mean", "sum"):
        raise losskit.ConfigError(f"charbonnier_loss: reduction must be 'mean' or 'sum', got {reduction!r}")
    total = torch.sqrt((pred - target).square() + eps * eps).sum()
    return total / max(pred.numel(), 1) if reduction == "mean" else total


class CharbonnierLoss(losskit.Criterion[CharbonnierLossConfig]):
    """Charbonnier (robust L1) loss between a prediction and a target of the same shape.

    Reference: Charbonnier et al., "Two deterministic half-quadratic regularization algorithms", 1994.
    """

    name = "charbonnier_loss"
    Config = CharbonnierLossConfig
    inputs = {"pred": "(N, *) float prediction"}
    targets = {"target": "(N, *) float target, same shape as pred"}

    def forward(self, out: Any, target: Any) -> Tensor:
        pred = get_tensor(
            out, "pred", criterion=self.name, side="out", expected="(N, *) float", float_only=True
        )
        tgt = get_tensor(target, "target", criterion=self.name, side="target", expected="same shape as pred")
        check_same_device(self.name, ("out['pred']", pred), ("target['target']", tgt))
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
