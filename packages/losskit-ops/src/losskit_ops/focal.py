# SPDX-License-Identifier: Apache-2.0
"""Sigmoid focal loss kernels: a torchvision drop-in with dense targets, and an indexed form.

Reference: Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017 (arXiv:1708.02002).
"""

from __future__ import annotations

from typing import Any, Literal, cast

import torch
from torch import Tensor

from losskit.checks import fmt_shape
from losskit.errors import ConfigError, InputError
from losskit_ops._focal_autograd import FocalDense, FocalIndexed, compute_dtype

__all__ = ["Reduction", "sigmoid_focal_loss", "sigmoid_focal_loss_indexed", "sigmoid_focal_loss_reference"]

Reduction = Literal["none", "mean", "sum"]
_REDUCTIONS = ("none", "mean", "sum")


def _check_params(name: str, alpha: float, gamma: float, reduction: str) -> tuple[float, float]:
    """Validate the hyper-parameters with torchvision's messages (a :class:`ConfigError` is a ValueError)."""
    if (
        not float(alpha) <= 1.0
    ):  # also rejects NaN; any negative alpha disables the weighting (torchvision: -1)
        raise ConfigError(f"Invalid alpha value: {alpha}. alpha must be in the range [0,1] or -1 for ignore.")
    if reduction not in _REDUCTIONS:
        raise ConfigError(
            f"Invalid Value for arg 'reduction': '{reduction} \n Supported reduction modes: 'none', 'mean', 'sum'"
        )
    alpha, gamma = float(alpha), float(gamma)
    if not (gamma >= 0.0 and gamma != float("inf")):
        raise ConfigError(f"{name}: gamma={gamma!r}; allowed: a finite number >= 0")
    return alpha, gamma


def sigmoid_focal_loss_reference(
    pred: Tensor, target: Tensor, alpha: float = 0.25, gamma: float = 2.0, reduction: Reduction = "none"
) -> Tensor:
    """The focal loss in plain differentiable torch ops (slow; used when the target needs a gradient).

    Same math and conventions as :func:`sigmoid_focal_loss`.
    """
    cdt = compute_dtype(pred.dtype)
    x = pred.to(cdt)
    t = target.to(cdt)
    q = torch.sigmoid(-x.abs())
    v = 1.0 - q
    tail = -torch.log(v) + (q - (1.0 - v)) / v  # log(1 + exp(-|x|))
    ce = x.clamp_min(0.0) - x * t + tail
    p = torch.sigmoid(x)
    m = p * (1.0 - t) + torch.sigmoid(-x) * t
    loss = ce * m.pow(gamma) if gamma != 0.0 else ce
    if alpha >= 0.0:
        loss = loss * ((1.0 - alpha) + (2.0 * alpha - 1.0) * t)
    if reduction == "none":
        return loss
    total = loss.sum()
    return total / max(loss.numel(), 1) if reduction == "mean" else total


def sigmoid_focal_loss(
    inputs: Tensor,
    targets: Tensor,
    alpha: float = 0.25,
    gamma: float = 2,
    reduction: str = "none",
) -> Tensor:
    """Sigmoid focal loss with dense targets: a drop-in for ``torchvision.ops.sigmoid_focal_loss``.

    Same signature, defaults and ``reduction`` error as torchvision's (swapping it in is a one-line
    change); TorchScript is not supported.

    ``loss = a_t * (1 - p_t) ** gamma * BCEWithLogits(pred, target)`` elementwise, with
    ``p = sigmoid(pred)``, ``p_t = p * target + (1 - p) * (1 - target)`` and
    ``a_t = alpha * target + (1 - alpha) * (1 - target)``.

    It is a custom autograd function: the forward and the analytic backward each make a few passes
    over cache-sized chunks and save only ``pred`` and ``target``, so the extra memory is the gradient
    plus a few hundred KiB. fp16/bf16 inputs are computed in fp32; the result is fp32 (float64 stays
    float64). Extreme logits (|x| = 100 and beyond) give finite values and gradients.

    Args:
        inputs: ``(*)`` logits, any floating dtype.
        targets: ``(*)`` targets of the same shape, 0/1 or soft in [0, 1] (any real dtype).
            Not differentiated unless it requires grad (then a slower plain-autograd path is used).
        alpha: weight of the positives in [0, 1]; a negative value disables the weighting.
        gamma: focusing parameter >= 0 (0 gives the alpha-weighted binary cross-entropy).
        reduction: ``"none"`` (``(*)``), ``"mean"`` (sum over all elements / their number) or ``"sum"``.

    Returns:
        The reduced loss (0-dim) or the elementwise loss. An empty input gives 0 for ``"mean"``
        (torchvision gives NaN).

    Reference: Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017.
    """
    name = "sigmoid_focal_loss"
    alpha, gamma = _check_params(name, alpha, gamma, reduction)
    pred, target = inputs, targets
    if not isinstance(pred, Tensor) or not pred.is_floating_point():
        raise InputError(name, "inputs", f"expected floating-point logits, got {_describe(pred)}")
    if not isinstance(target, Tensor) or target.is_complex():
        raise InputError(name, "targets", f"expected a real tensor, got {_describe(target)}")
    if target.shape != pred.shape:
        raise InputError(
            name,
            "targets",
            f"expected the shape of inputs {fmt_shape(pred.shape)}, got {fmt_shape(target.shape)}",
        )
    if target.device != pred.device:
        raise InputError(name, "targets", f"on {target.device}, but inputs is on {pred.device}")
    if target.requires_grad:
        return sigmoid_focal_loss_reference(
            pred, target, alpha=alpha, gamma=gamma, reduction=cast(Reduction, reduction)
        )
    if target.dtype == torch.bool:
        target = target.to(torch.uint8)
    return FocalDense.apply(pred, target, alpha, gamma, reduction)


def sigmoid_focal_loss_indexed(
    pred: Tensor,
    labels: Tensor,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
    weight: Tensor | None = None,
    reduction: Reduction = "sum",
) -> Tensor:
    """Sigmoid focal loss of ``(N, C)`` logits against one-hot targets given as class indices.

    Equal to :func:`sigmoid_focal_loss` with the dense one-hot target (row ``i`` is 1 at
    ``labels[i]``, all zero when ``labels[i] == -1``) and each row's loss multiplied by ``weight[i]``,
    without ever building the ``(N, C)`` target: the loss of the all-zero target is computed densely
    and corrected at the ``N`` labelled positions. Dense detectors (RetinaNet) use it with
    ``reduction="sum"``, folding their foreground normaliser and ignore mask into ``weight``.

    Args:
        pred: ``(N, C)`` logits, any floating dtype.
        labels: ``(N,)`` integer class indices in ``[0, C)``, or ``-1`` for an all-zero target row.
            Values outside ``[-1, C)`` are treated as ``-1`` (not checked here: no device sync).
        alpha: weight of the positives in [0, 1]; a negative value disables the weighting.
        gamma: focusing parameter >= 0.
        weight: ``(N,)`` per-row weight (0 drops the row), or None. Differentiable.
        reduction: ``"sum"``, ``"mean"`` (the sum divided by ``N * C``) or ``"none"`` (``(N, C)``).

    Returns:
        The reduced loss (0-dim, fp32 for half inputs) or the ``(N, C)`` elementwise loss.

    Reference: Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017.
    """
    name = "sigmoid_focal_loss_indexed"
    alpha, gamma = _check_params(name, alpha, gamma, reduction)
    if not isinstance(pred, Tensor) or not pred.is_floating_point() or pred.dim() != 2:
        raise InputError(name, "pred", f"expected floating-point logits (N, C), got {_describe(pred)}")
    n = pred.shape[0]
    if (
        not isinstance(labels, Tensor)
        or labels.is_floating_point()
        or labels.is_complex()
        or labels.dtype == torch.bool
        or labels.shape != (n,)
    ):
        raise InputError(name, "labels", f"expected integer class indices ({n},), got {_describe(labels)}")
    if labels.device != pred.device:
        raise InputError(name, "labels", f"on {labels.device}, but pred is on {pred.device}")
    if weight is not None:
        if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.shape != (n,):
            raise InputError(
                name, "weight", f"expected a float tensor ({n},) or None, got {_describe(weight)}"
            )
        if weight.device != pred.device:
            raise InputError(name, "weight", f"on {weight.device}, but pred is on {pred.device}")
    return FocalIndexed.apply(pred, labels, weight, alpha, gamma, reduction)


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} tensor of shape {fmt_shape(value.shape)}"
    return type(value).__name__
