# SPDX-License-Identifier: Apache-2.0
"""The ``focal_loss`` criterion; its kernels live in ``losskit_ops`` (re-exported here for existing imports).

Reference: Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017 (arXiv:1708.02002).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from losskit import Criterion, InputError, option
from losskit.checks import (
    check_same_device,
    explain_non_finite,
    fmt_shape,
    get_tensor,
    value_checks_enabled,
)
from losskit.dist import global_mean
from losskit_ops.focal import (
    Reduction,
    sigmoid_focal_loss,
    sigmoid_focal_loss_indexed,
    sigmoid_focal_loss_reference,
)

__all__ = [
    "FocalLoss",
    "FocalLossConfig",
    "focal_loss",
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_indexed",
    "sigmoid_focal_loss_reference",
]


@dataclass(frozen=True)
class FocalLossConfig:
    """The fields of ``focal_loss``: the only place their defaults are written."""

    alpha: float = option(
        0.25,
        le=1.0,
        ge=0.0,
        negative_disables=True,
        doc="Weight of the positive targets (1 - alpha for the negatives); negative disables it.",
    )
    gamma: float = option(2.0, ge=0.0, doc="Focusing parameter: (1 - p_t) ** gamma scales each element.")
    normalize_across_ranks: bool = option(
        False,
        doc="Divide by the mean element count over DDP ranks instead of the local count "
        "(only differs when ranks hold batches of different sizes).",
    )


def focal_loss(
    pred: Tensor,
    target: Tensor,
    *,
    alpha: float = FocalLossConfig.alpha,
    gamma: float = FocalLossConfig.gamma,
    reduction: Reduction = "mean",
) -> Tensor:
    """Focal loss with dense targets of ``pred``'s shape, or class indices ``(N,)`` for ``(N, C)`` logits.

    Dispatches to :func:`sigmoid_focal_loss` or :func:`sigmoid_focal_loss_indexed` (index ``-1`` is
    an all-zero row). ``"mean"`` divides by ``pred.numel()`` in both cases.
    """
    if _is_index_target(pred, target):
        return sigmoid_focal_loss_indexed(pred, target, alpha=alpha, gamma=gamma, reduction=reduction)
    return sigmoid_focal_loss(pred, target, alpha=alpha, gamma=gamma, reduction=reduction)


def _is_index_target(pred: Tensor, target: Tensor) -> bool:
    return (
        pred.dim() == 2
        and target.dim() == 1
        and not target.is_floating_point()
        and not target.is_complex()
        and target.dtype != torch.bool
    )


class FocalLoss(Criterion[FocalLossConfig]):
    """Sigmoid focal loss (Lin et al. 2017), the mean over all elements, as torchvision computes it.

    ``loss = mean(a_t * (1 - p_t) ** gamma * BCEWithLogits(pred, target))`` over every element of
    ``pred``, equal to ``torchvision.ops.sigmoid_focal_loss(pred, target, alpha, gamma, "mean")``,
    computed by a fused, chunked autograd function (several times faster, a fraction of the memory).

    Inputs:
        out["pred"]: ``(*)`` logits, any floating dtype (fp16/bf16 are computed in fp32).
        target["target"]: ``(*)`` 0/1 or soft targets in [0, 1] of ``pred``'s shape; or, for
            ``(N, C)`` logits, integer class indices ``(N,)`` (one-hot; ``-1`` = no positive class).

    Reduction: the sum over all elements divided by their number ``pred.numel()`` (a static count).
    Under DDP, averaging the per-rank gradients gives the gradient of the global mean when every rank
    has the same number of elements; ``normalize_across_ranks`` makes it exact for unequal batches.

    Reference: Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017 (arXiv:1708.02002).
    """

    name: ClassVar[str] = "focal_loss"

    Config = FocalLossConfig

    inputs: ClassVar[Mapping[str, str]] = {
        "pred": "(*) logits, any floating dtype",
    }
    targets: ClassVar[Mapping[str, str]] = {
        "target": "(*) 0/1 or soft targets in [0, 1] of pred's shape, or int class indices (N,) "
        "for pred (N, C) (-1 = no positive)",
    }

    def forward(self, out: Mapping[str, Any], target: Mapping[str, Any]) -> Tensor:
        name = self.name
        pred = get_tensor(out, "pred", criterion=name, side="out", expected="logits (*)", float_only=True)
        tgt = get_tensor(
            target,
            "target",
            criterion=name,
            side="target",
            expected="targets of pred's shape, or int class indices (N,) for pred (N, C)",
        )
        check_same_device(name, ("out['pred']", pred), ("target['target']", tgt))
        cfg = self.config
        indexed = _is_index_target(pred, tgt)
        if indexed:
            if tgt.shape[0] != pred.shape[0]:
                raise InputError(
                    name,
                    "target['target']",
                    f"class indices must have shape ({pred.shape[0]},) for out['pred'] of shape "
                    f"{fmt_shape(pred.shape)}, got {fmt_shape(tgt.shape)}",
                )
            if value_checks_enabled(tgt) and tgt.numel():
                lo, hi = torch.aminmax(tgt)
                if int(lo) < -1 or int(hi) >= pred.shape[1]:
                    raise InputError(
                        name,
                        "target['target']",
                        f"class indices must be in [-1, {pred.shape[1] - 1}] (C = {pred.shape[1]}), "
                        f"got values in [{int(lo)}, {int(hi)}]",
                    )
        else:
            if tgt.shape != pred.shape:
                hint = (
                    " (class indices (N,) are accepted only for pred (N, C))"
                    if not tgt.is_floating_point()
                    else ""
                )
                raise InputError(
                    name,
                    "target['target']",
                    f"expected the shape of out['pred'] {fmt_shape(pred.shape)}, got "
                    f"{fmt_shape(tgt.shape)} ({tgt.dtype}){hint}",
                )
            if tgt.is_complex():
                raise InputError(name, "target['target']", f"expected a real tensor, got {tgt.dtype}")
        reduction: Reduction = "sum" if cfg.normalize_across_ranks else "mean"
        if indexed:
            loss = sigmoid_focal_loss_indexed(
                pred, tgt, alpha=cfg.alpha, gamma=cfg.gamma, reduction=reduction
            )
        else:
            loss = sigmoid_focal_loss(pred, tgt, alpha=cfg.alpha, gamma=cfg.gamma, reduction=reduction)
        if cfg.normalize_across_ranks:
            # the sum is exactly 0 when there is no element, so a tiny clamp keeps fractional means exact
            count = torch.full((), float(pred.numel()), dtype=torch.float64, device=pred.device)  # no copy
            loss = loss / global_mean(count, enabled=True, min=1e-12).to(loss.dtype)
        if value_checks_enabled(loss) and not math.isfinite(loss.item()):
            raise explain_non_finite(name, [("out['pred']", pred), ("target['target']", tgt)]) or InputError(
                name, "target['target']", "the loss is not finite; targets must be in [0, 1]"
            )
        return loss

    def example(
        self,
        batch_size: int = 2,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        num_classes = 4
        pred = torch.randn(batch_size, num_classes, generator=generator).to(device).requires_grad_()
        labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
        target = torch.nn.functional.one_hot(labels, num_classes).float().to(device)
        return {"pred": pred}, {"target": target}
