# SPDX-License-Identifier: Apache-2.0
"""Cross-entropy with class indices or soft labels: the ``cross_entropy`` criterion.

Torch's own kernels (same value and gradients as :func:`torch.nn.functional.cross_entropy`), except
where torch's result is not usable for training: a batch whose every element is ignored gives 0 with
zero gradients (torch gives NaN), without a host-device synchronisation. Soft labels call
``F.cross_entropy`` itself. Index targets take one of two paths:

* the fast path, where reading a value costs nothing (CPU, not tracing): torch's cross-entropy kernel
  with the mean reduction, its value read back; a finite value is the result, so a call costs what
  ``F.cross_entropy`` costs;
* the sum path, everywhere else and after a non-finite read-back (every element ignored: 0 / 0): the
  two kernels ``F.cross_entropy`` runs, ``log_softmax`` and the NLL forward with the sum reduction
  (whose second output is the mean's denominator), and the sum divided by the clamped denominator,
  with no read-back.

The kernels are called through :mod:`losskit_classification._torch_kernels`, the one module that uses
private torch bindings (with a public fallback).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from losskit import Criterion, InputError, option
from losskit.checks import (
    check_same_device,
    explain_non_finite,
    fmt_shape,
    get_tensor,
    reads_are_free,
    value_checks_enabled,
)
from losskit.dist import global_mean
from losskit_classification import _torch_kernels as kernels

__all__ = ["CrossEntropy", "CrossEntropyConfig", "cross_entropy"]


@dataclass(frozen=True)
class CrossEntropyConfig:
    """The fields of ``cross_entropy``: the only place their defaults are written."""

    label_smoothing: float = option(
        0.0, ge=0.0, le=1.0, doc="Mix the target with the uniform distribution by this amount."
    )
    ignore_index: int = option(-100, doc="Class index whose elements are skipped (index targets only).")
    class_weights: tuple[float, ...] | None = option(
        None,
        ge=0.0,
        min_items=1,
        doc="Per-class rescaling (C values, torch's 'weight'); null for none.",
    )
    normalize_across_ranks: bool = option(
        False,
        doc="Divide by the mean over DDP ranks of the count (or class-weight sum) of non-ignored "
        "elements instead of the local one.",
    )


#: Lower clamp of the normaliser: the loss sum is exactly 0 when nothing is counted, so any
#: positive value gives 0; a tiny one keeps fractional cross-rank means (DDP) exact.
_MIN_NORMALIZER = 1e-12
#: Logit dtypes computed as given (others in float32).
_FAST_DTYPES = frozenset({torch.float32, torch.float64})
#: Integer dtypes accepted as class indices (bool and complex are not).
_INDEX_DTYPES = frozenset(
    {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32, torch.uint64}
)


def cross_entropy(
    pred: Tensor,
    target: Tensor,
    *,
    weight: Tensor | None = None,
    ignore_index: int = CrossEntropyConfig.ignore_index,
    label_smoothing: float = CrossEntropyConfig.label_smoothing,
    normalize_across_ranks: bool = CrossEntropyConfig.normalize_across_ranks,
) -> Tensor:
    """Mean cross-entropy, ``F.cross_entropy(..., reduction="mean")`` without NaN for all-ignored batches.

    Args:
        pred: ``(N, C)`` or ``(N, C, d1, ..., dk)`` logits (fp16/bf16 are computed in fp32).
        target: integer class indices ``(N,)`` / ``(N, d1, ..., dk)``, or float class probabilities
            of ``pred``'s shape (soft labels); the path is chosen from the dtype.
        weight: ``(C,)`` per-class rescaling, or None.
        ignore_index: class index whose elements are skipped (index targets only).
        label_smoothing: in [0, 1], mixes the target with the uniform distribution.
        normalize_across_ranks: divide by the mean over DDP ranks of the normaliser (index targets).

    Returns:
        A 0-dim tensor. Index targets: the sum of the (weighted, smoothed) per-element losses over
        non-ignored elements divided by the sum of their class weights (their number without
        weights), 0 when there is none. Soft labels: the mean over all ``N * d1 * ... * dk`` elements,
        as torch computes it.

    Index targets without ``normalize_across_ranks`` take the fast path where reads are free (see the
    module doc); nothing is read back on other devices. No input is checked here (the criterion does).
    """
    x, weight = _in_compute_dtype(pred, weight)
    if target.is_floating_point():
        return _soft_mean(x, target, weight, label_smoothing)
    t = target if target.dtype == torch.int64 else target.long()
    if not normalize_across_ranks and reads_are_free(x):
        loss = _fast_mean(x, t, weight, ignore_index, label_smoothing)
        if loss is not None:
            return loss
    return _index_mean(x, t, weight, ignore_index, label_smoothing, normalize_across_ranks)[0]


def _in_compute_dtype(pred: Tensor, weight: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The logits in float32 or float64, and the class weights in their dtype and on their device."""
    x = pred if pred.dtype in _FAST_DTYPES else pred.float()
    if weight is not None and (weight.dtype != x.dtype or weight.device != x.device):
        weight = weight.to(device=x.device, dtype=x.dtype)
    return x, weight


def _fast_mean(
    x: Tensor, t: Tensor, weight: Tensor | None, ignore_index: int, label_smoothing: float
) -> Tensor | None:
    """The fast path: torch's mean-reduction kernel and a read of its value (free only where
    :func:`losskit.checks.reads_are_free`); ``None`` when the value is not finite (every element
    ignored, or non-finite inputs), for the sum path to decide."""
    loss = kernels.cross_entropy_mean(x, t, weight, ignore_index, label_smoothing)
    return loss if math.isfinite(loss.item()) else None


def _soft_mean(x: Tensor, target: Tensor, weight: Tensor | None, label_smoothing: float) -> Tensor:
    t = target if target.dtype == x.dtype else target.to(x.dtype)
    if t.numel() == 0:  # torch's mean over no element is NaN
        return F.cross_entropy(x, t, weight=weight, label_smoothing=label_smoothing, reduction="sum")
    return F.cross_entropy(x, t, weight=weight, label_smoothing=label_smoothing)


def _index_mean(
    x: Tensor,
    t: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    normalize_across_ranks: bool,
) -> tuple[Tensor, Tensor]:
    """The sum path: ``(loss, local denominator)``, the loss 0 when nothing is counted. No read-back."""
    logp = torch.log_softmax(x, 1)
    total, count = kernels.nll_sum_and_count(logp, t, weight, ignore_index)
    if label_smoothing != 0.0:
        # the uniform target's loss -sum_c w_c logp_c over the non-ignored elements
        if weight is None:
            smooth = logp.sum(1)
        else:
            smooth = (logp * weight.view(-1, *([1] * (x.dim() - 2)))).sum(1)
        smooth = -smooth.masked_fill(t == ignore_index, 0.0).sum()
        total = total * (1.0 - label_smoothing) + smooth * (label_smoothing / x.shape[1])
    if normalize_across_ranks:
        norm = global_mean(count, enabled=True, min=_MIN_NORMALIZER)
    else:
        norm = count.clamp_min(_MIN_NORMALIZER)
    return total / norm, count


class CrossEntropy(Criterion[CrossEntropyConfig]):
    """Cross-entropy over class logits, the mean over non-ignored elements, as ``torch.nn.CrossEntropyLoss``.

    Equal to ``torch.nn.functional.cross_entropy(pred, target, weight=class_weights,
    ignore_index=ignore_index, label_smoothing=label_smoothing)``, including every combination of
    smoothing, ignored elements and class weights, except that a batch with every element ignored
    gives 0 with zero gradients instead of NaN.

    Inputs:
        out["pred"]: ``(N, C)`` or ``(N, C, d1, ..., dk)`` logits, any floating dtype.
        target["target"]: int class indices ``(N,)`` / ``(N, d1, ..., dk)``, or float class
            probabilities of ``pred``'s shape (soft labels from mixup/cutmix).

    Reduction: see ``docs/classification.md`` (index targets: divided by the count, or class-weight
    sum, of non-ignored elements; soft labels: by ``N * d1 * ... * dk``; ``normalize_across_ranks``
    averages the denominator over DDP ranks).

    Reference: ``torch.nn.CrossEntropyLoss``; label smoothing: Szegedy et al., "Rethinking the
    Inception Architecture for Computer Vision", CVPR 2016.
    """

    name: ClassVar[str] = "cross_entropy"
    Config = CrossEntropyConfig

    inputs: ClassVar[Mapping[str, str]] = {
        "pred": "(N, C) or (N, C, d1, ..., dk) logits, any floating dtype",
    }
    targets: ClassVar[Mapping[str, str]] = {
        "target": "int class indices (N,) / (N, d1, ..., dk), or float class probabilities of pred's shape",
    }

    class_weights: Tensor | None

    def __init__(self, config: CrossEntropyConfig | None = None, /, **fields: Any) -> None:
        super().__init__(config, **fields)
        self.register_config_buffer("class_weights", self.config.class_weights, dtype=torch.float32)

    def forward(self, out: Mapping[str, Any], target: Mapping[str, Any]) -> Tensor:
        try:
            pred = out["pred"]
            tgt = target["target"]
        except Exception:  # not a mapping, or a key is missing: _check_inputs says which
            pred = tgt = None
        if not (isinstance(pred, Tensor) and isinstance(tgt, Tensor)):
            pred, tgt = self._check_inputs(out, target)
        cfg = self.config
        weights = self._buffers["class_weights"]  # the buffer, without nn.Module.__getattr__'s lookup
        if (
            tgt.dtype is torch.int64
            and pred.dtype in _FAST_DTYPES
            and tgt.is_cpu
            and pred.dim() >= 2
            and tgt.dim() == pred.dim() - 1
            and (weights is None or weights.dtype is pred.dtype)
            and not cfg.normalize_across_ranks
            and reads_are_free(pred)
        ):
            # The common case, every step: int64 class indices on CPU. Only attributes are checked
            # here; torch's kernel checks the sizes, the weights' length and the class range, and its
            # errors are translated. This keeps the criterion within 5% of F.cross_entropy at
            # (256, 1000) (benchmarks/classification.py).
            try:
                loss = _fast_mean(pred, tgt, weights, cfg.ignore_index, cfg.label_smoothing)
            except (IndexError, RuntimeError, ValueError) as exc:
                self._check_index_inputs(pred, tgt, weights, cause=exc)
                loss = None  # the inputs are fine: torch refused what the sum path converts (devices)
            if loss is not None:
                return loss
        return self._checked_forward(pred, tgt, weights)

    def _checked_forward(self, pred: Tensor, tgt: Tensor, weights: Tensor | None) -> Tensor:
        """Every other case: all the checks first, then the soft-label or the sum path."""
        if not pred.is_floating_point():
            pred, tgt = self._check_inputs({"pred": pred}, {"target": tgt})
        cfg = self.config
        x, w = _in_compute_dtype(pred, weights)
        if tgt.is_floating_point():
            self._check_shapes(pred, tgt)
            self._check_weights(pred, weights)
            loss = _soft_mean(x, tgt, w, cfg.label_smoothing)
            if value_checks_enabled(loss) and not math.isfinite(loss.item()):
                raise self._explain_non_finite(pred, tgt)
            return loss
        self._check_index_inputs(pred, tgt, weights)
        t = tgt if tgt.dtype == torch.int64 else tgt.long()
        try:
            loss, count = _index_mean(
                x, t, w, cfg.ignore_index, cfg.label_smoothing, cfg.normalize_across_ranks
            )
        except (IndexError, RuntimeError) as exc:
            self._check_range(tgt, pred.shape[1], cause=exc)
            raise
        # Non-finite logits give a non-finite loss, except when every element is ignored: the loss is
        # then 0 but its gradient NaN, so the logits are looked at too.
        if value_checks_enabled(loss) and (
            not math.isfinite(loss.item()) or (count.item() == 0 and not bool(torch.isfinite(pred).all()))
        ):
            raise self._explain_non_finite(pred, tgt)
        return loss

    def _check_index_inputs(
        self, pred: Tensor, tgt: Tensor, weights: Tensor | None, cause: BaseException | None = None
    ) -> None:
        """Raise the :class:`InputError` for bad logits / class indices (the range too, where values
        may be read); ``cause`` is torch's error that led here, if any."""
        self._check_shapes(pred, tgt, cause=cause)
        self._check_weights(pred, weights, cause=cause)
        if cause is not None or (not tgt.is_cpu and value_checks_enabled(tgt)):
            # on CPU without a cause, the range is left to torch's check, translated when it fails
            self._check_range(tgt, pred.shape[1], cause=cause)

    def _check_weights(
        self, pred: Tensor, weights: Tensor | None, cause: BaseException | None = None
    ) -> None:
        if weights is not None and weights.shape[0] != pred.shape[1]:
            raise InputError(
                self.name,
                "out['pred']",
                f"has C = {pred.shape[1]} classes (shape {fmt_shape(pred.shape)}), but class_weights has "
                f"{weights.shape[0]} values",
            ) from cause

    def _check_inputs(self, out: Any, target: Any) -> tuple[Tensor, Tensor]:
        """The two input tensors, or the :class:`InputError` that says what is wrong with them."""
        pred = get_tensor(
            out, "pred", criterion=self.name, side="out", expected="logits (N, C, *)", float_only=True
        )
        tgt = get_tensor(
            target,
            "target",
            criterion=self.name,
            side="target",
            expected="class indices (N, *) or probabilities",
        )
        return pred, tgt

    def _check_shapes(self, pred: Tensor, tgt: Tensor, cause: BaseException | None = None) -> None:
        """Raise the :class:`InputError` for logits and targets that do not fit together."""
        name, shape = self.name, pred.shape
        if len(shape) < 2:
            raise InputError(
                name,
                "out['pred']",
                f"expected logits (N, C) or (N, C, d1, ...), got shape {fmt_shape(shape)}",
            ) from cause
        if shape[1] == 0:
            raise InputError(name, "out['pred']", f"has no classes (shape {fmt_shape(shape)})") from cause
        try:
            check_same_device(name, ("out['pred']", pred), ("target['target']", tgt))
        except InputError as err:
            raise err from cause
        if tgt.is_floating_point():
            if tgt.shape != shape:
                raise InputError(
                    name,
                    "target['target']",
                    f"float targets are class probabilities and need the shape of out['pred'] "
                    f"{fmt_shape(shape)}, got {fmt_shape(tgt.shape)}; class indices must be an "
                    "integer tensor",
                ) from cause
            return
        if tgt.dtype not in _INDEX_DTYPES:
            raise InputError(
                name,
                "target['target']",
                f"expected integer class indices or float probabilities, got {tgt.dtype}",
            ) from cause
        expected = (shape[0], *shape[2:])
        if tuple(tgt.shape) != expected:
            raise InputError(
                name,
                "target['target']",
                f"class indices for out['pred'] of shape {fmt_shape(shape)} need shape "
                f"{fmt_shape(expected)}, got {fmt_shape(tgt.shape)}",
            ) from cause

    def _explain_non_finite(self, pred: Tensor, tgt: Tensor) -> InputError:
        return explain_non_finite(
            self.name, [("out['pred']", pred), ("target['target']", tgt)]
        ) or InputError(
            self.name,
            "target['target']",
            "the loss is not finite: class probabilities must be finite and >= 0 (and class_weights must "
            "not give every counted element a zero weight)",
        )

    def _check_range(self, tgt: Tensor, num_classes: int, cause: BaseException | None = None) -> None:
        """Raise :class:`InputError` when a class index is neither in [0, C) nor ``ignore_index``."""
        ignore = self.config.ignore_index
        bad = (tgt != ignore) & ((tgt < 0) | (tgt >= num_classes))
        if bool(bad.any()):
            values = torch.unique(tgt[bad])[:5].tolist()
            raise InputError(
                self.name,
                "target['target']",
                f"class indices must be in [0, {num_classes - 1}] (C = {num_classes}) or ignore_index "
                f"({ignore}), got {values}",
            ) from cause

    def example(
        self,
        batch_size: int = 2,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        num_classes = len(self.config.class_weights) if self.config.class_weights is not None else 5
        pred = torch.randn(batch_size, num_classes, generator=generator).to(device).requires_grad_()
        target = torch.randint(0, num_classes, (batch_size,), generator=generator).to(device)
        return {"pred": pred}, {"target": target}
