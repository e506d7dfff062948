# SPDX-License-Identifier: Apache-2.0
"""``seg_cross_entropy``: NetsPresso Trainer's segmentation cross-entropy, without full-resolution logits.

Functional form :func:`seg_cross_entropy`; criterion :class:`SegCrossEntropy` (registered as
``seg_cross_entropy``); config :class:`SegCrossEntropyConfig`, the one place where the defaults live.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from losskit import ConfigError, Criterion, InputError, option
from losskit.checks import check_same_device, fmt_shape, get_tensor, value_checks_enabled
from losskit.dist import global_mean
from losskit.tensors import autocast_off, graph_zero
from losskit_ops import resize2d, upsampled_ce_sum

__all__ = ["SegCrossEntropy", "SegCrossEntropyConfig", "seg_cross_entropy"]

NAME = "seg_cross_entropy"

#: Label given to invalid pixels on the equal-size path, where torch's kernel skips them (any negative
#: value works: valid labels are >= 0).
_SKIP = -100

_DEPRECATED = (
    "{key} is deprecated in torch (torch.nn.CrossEntropyLoss's size_average and reduce were replaced "
    "by reduction='mean'|'sum'|'none' in torch 0.4.1) and NetsPresso only passes it through; "
    "seg_cross_entropy always reduces by the mean over non-ignored pixels (divided by the sum of their "
    "class_weights when set), which is reduction='mean': remove the key, got {value!r}"
)


@dataclass(frozen=True)
class SegCrossEntropyConfig:
    """Fields of ``seg_cross_entropy``; defaults are what NetsPresso Trainer's segmentation configs set."""

    ignore_index: int = option(
        255,
        doc="Label of ignored pixels (not counted). Every NetsPresso segmentation config sets 255; its "
        "class default is -100.",
    )
    label_smoothing: float = option(
        0.0, ge=0.0, le=1.0, doc="Mix the target with the uniform distribution by this amount, as torch."
    )
    class_weights: tuple[float, ...] | None = option(
        None, ge=0.0, min_items=1, doc="Per-class weights (C values, torch's 'weight'), or null for none."
    )
    align_corners: bool = option(
        False, doc="align_corners of the bilinear resizing of the logits to label size."
    )
    normalize_across_ranks: bool = option(
        False,
        doc="Divide by the mean over DDP ranks of the count (class-weight sum) of non-ignored pixels.",
    )
    #: NetsPresso passes torch's deprecated keys through; losskit refuses them with what to do instead.
    rejected_fields: ClassVar[dict[str, str]] = {"size_average": _DEPRECATED, "reduce": _DEPRECATED}


def _check_inputs(pred: Tensor, target: Tensor, num_weights: int | None) -> None:
    """Shape, dtype and device checks: attributes only, no device sync."""
    if not pred.is_floating_point():
        raise InputError(NAME, "out['pred']", f"expected floating-point logits, got {pred.dtype}")
    if pred.dim() != 4 or min(pred.shape[1:]) < 1:
        raise InputError(
            NAME,
            "out['pred']",
            f"expected (B, C, h, w) logits with C, h, w >= 1, got shape {fmt_shape(pred.shape)}",
        )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise InputError(NAME, "target['target']", f"expected integer class labels, got {target.dtype}")
    if target.dim() != 3 or target.shape[0] != pred.shape[0]:
        raise InputError(
            NAME,
            "target['target']",
            f"expected (B, H, W) labels with B = {pred.shape[0]} (from out['pred'] "
            f"{fmt_shape(pred.shape)}), got shape {fmt_shape(target.shape)}",
        )
    check_same_device(NAME, ("out['pred']", pred), ("target['target']", target))
    if num_weights is not None and num_weights != pred.shape[1]:
        raise InputError(
            NAME,
            "out['pred']",
            f"has C = {pred.shape[1]} classes (shape {fmt_shape(pred.shape)}), but class_weights has "
            f"{num_weights} values",
        )


def _valid_mask(target: Tensor, ignore_index: int, classes: int) -> Tensor:
    """Pixels that count: labels in ``[0, C)`` other than ``ignore_index``."""
    valid = (target >= 0) & (target < classes)
    if 0 <= ignore_index < classes:  # otherwise the range test already leaves it out
        valid &= target != ignore_index
    return valid


def _check_labels(target: Tensor, valid: Tensor, counted: Tensor, ignore_index: int, classes: int) -> None:
    """Labels outside ``[0, C)`` other than ``ignore_index`` (reads values: call where checks run)."""
    ignored = torch.count_nonzero(target == ignore_index)
    if int(counted) + int(ignored) == target.numel():  # every pixel is counted or ignored
        return
    bad = ~valid & (target != ignore_index)
    example = int(target[bad][0])
    raise InputError(
        NAME,
        "target['target']",
        f"labels must lie in [0, {classes}) or equal ignore_index={ignore_index}; "
        f"found {example!r} ({int(bad.sum())} pixels)",
    )


def _numerator(
    x: Tensor,
    target: Tensor,
    labels: Tensor,
    valid: Tensor,
    cw: Tensor | None,
    label_smoothing: float,
    align_corners: bool,
    band_elements: int | None,
) -> Tensor:
    """``sum_V ((1 - eps) w_y nll + eps / C sum_c w_c (-log p_c))``: F.cross_entropy's sum reduction.

    Resized: ``-sum_c w_c log p_c = (sum_c w_c) lse - sum_c w_c up(x)_c``; the banded kernel sums the
    ``nll`` and ``lse`` parts, and the last sum is the resizing of the one-channel ``sum_c w_c x_c``
    (bilinear resizing is linear per channel).
    """
    size = (labels.shape[-2], labels.shape[-1])
    if (x.shape[-2], x.shape[-1]) == size:  # no resizing: torch's kernel, invalid pixels skipped
        skip = torch.where(valid, target, _SKIP)
        return F.cross_entropy(
            x, skip, weight=cw, ignore_index=_SKIP, label_smoothing=label_smoothing, reduction="sum"
        )
    mask = valid.to(x.dtype)
    pixel_weight = mask if cw is None else cw[labels] * mask
    if label_smoothing == 0.0:
        return upsampled_ce_sum(
            x, labels, pixel_weight, align_corners=align_corners, band_elements=band_elements
        )
    share = label_smoothing / x.shape[1]
    weight_sum: float | Tensor
    if cw is None:
        mass, weight_sum = x.sum(dim=1, keepdim=True), float(x.shape[1])
    else:
        # a product and a sum, not einsum: its matmul backward would run in bf16/fp16 under autocast
        mass, weight_sum = (x * cw.view(1, -1, 1, 1)).sum(dim=1, keepdim=True), cw.sum()
    banded = upsampled_ce_sum(
        x,
        labels,
        (1.0 - label_smoothing) * pixel_weight,
        (share * weight_sum) * mask,
        align_corners=align_corners,
        band_elements=band_elements,
    )
    up_mass = resize2d(mass, size, align_corners=align_corners, band_elements=band_elements)
    return banded - share * (up_mass[:, 0] * mask).sum()


def seg_cross_entropy(
    pred: Tensor,
    target: Tensor,
    *,
    ignore_index: int = SegCrossEntropyConfig.ignore_index,
    label_smoothing: float = SegCrossEntropyConfig.label_smoothing,
    class_weights: Sequence[float] | Tensor | None = SegCrossEntropyConfig.class_weights,
    align_corners: bool = SegCrossEntropyConfig.align_corners,
    normalize_across_ranks: bool = SegCrossEntropyConfig.normalize_across_ranks,
    band_elements: int | None = None,
) -> Tensor:
    """Cross-entropy of ``pred`` bilinearly resized to the labels' size, mean over non-ignored pixels.

    Equals ``F.cross_entropy(F.interpolate(pred, target.shape[-2:], mode="bilinear",
    align_corners=align_corners), target, weight=class_weights, ignore_index=ignore_index,
    label_smoothing=label_smoothing)`` (values and gradients), except that a batch without a counted
    pixel gives 0 with zero gradients instead of NaN. With ``V`` the non-ignored pixels, ``up`` the
    resized logits, ``p = softmax(up)``, ``w`` the class weights (all 1 without) and ``eps`` the
    smoothing::

        loss = sum_V [(1 - eps) w_y (-log p_y) + eps / C sum_c w_c (-log p_c)] / sum_V w_y

    The resized ``(B, C, H, W)`` logits are never held as a whole (see ``losskit_ops.upsampled_ce_sum``);
    when ``(h, w) == (H, W)`` nothing is resized.

    Args:
        pred: ``(B, C, h, w)`` logits at any resolution; fp16/bf16 are computed in fp32, fp64 in fp64,
            with autocast off.
        target: ``(B, H, W)`` integer labels in ``[0, C)`` or ``ignore_index``.
        ignore_index: label of ignored pixels.
        label_smoothing: in ``[0, 1]``, as ``F.cross_entropy``.
        class_weights: ``C`` per-class weights, or None.
        align_corners: of the bilinear resizing.
        normalize_across_ranks: divide by the mean over ``torch.distributed`` ranks of the denominator
            (when a process group is initialised), making DDP's averaged gradients those of the global
            batch.
        band_elements: elements per band buffer of the banded kernels (default: by device).

    Returns:
        A 0-dim fp32 tensor (fp64 for fp64 logits).

    Raises:
        losskit.ConfigError: ``label_smoothing`` outside ``[0, 1]``.
        losskit.InputError: malformed inputs (shapes, dtypes, devices, ``class_weights`` length); where
            value checks run (CPU by default), labels outside ``[0, C)`` other than ``ignore_index`` and
            non-finite logits. Without value checks such labels are left out like ignored pixels.
    """
    if not 0.0 <= label_smoothing <= 1.0:
        raise ConfigError(f"{NAME}: label_smoothing must be in [0, 1], got {label_smoothing!r}")
    num_weights = None
    if class_weights is not None:
        num_weights = class_weights.numel() if isinstance(class_weights, Tensor) else len(class_weights)
    _check_inputs(pred, target, num_weights)
    classes = pred.shape[1]
    if target.numel() == 0:
        return graph_zero(pred)
    dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
    device = pred.device
    checks = value_checks_enabled(pred)
    with autocast_off(device.type):
        target = target.long()
        valid = _valid_mask(target, ignore_index, classes)
        n_valid = torch.count_nonzero(valid)
        if checks:
            _check_labels(target, valid, n_valid, ignore_index, classes)
        labels = torch.where(valid, target, 0)
        x = pred.to(dtype)
        cw = None
        if class_weights is not None:
            cw = torch.as_tensor(class_weights, dtype=dtype).to(device=device, non_blocking=True)
        numerator = _numerator(x, target, labels, valid, cw, label_smoothing, align_corners, band_elements)
        # Non-finite logits make the sum non-finite (every pixel's log-sum-exp enters it): one scalar read
        # instead of a pass over the logits.
        if checks and not bool(torch.isfinite(numerator)) and not bool(torch.isfinite(pred).all()):
            raise InputError(NAME, "out['pred']", "contains NaN or infinite logits")
        counted = n_valid.to(dtype) if cw is None else (cw[labels] * valid).sum()
        denominator = global_mean(counted, enabled=normalize_across_ranks, min=None)
        denominator = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
        return numerator / denominator


class SegCrossEntropy(Criterion[SegCrossEntropyConfig]):
    """Segmentation cross-entropy of logits bilinearly resized to the label size (NetsPresso Trainer's
    ``seg_cross_entropy``), computed without holding the full-resolution logits.

    ``F.cross_entropy(F.interpolate(out["pred"], target["target"].shape[-2:], mode="bilinear",
    align_corners=False), target["target"], weight=class_weights, ignore_index=ignore_index,
    label_smoothing=label_smoothing)``: the mean over non-ignored pixels (the class-weighted mean with
    ``class_weights``), 0 instead of NaN when no pixel counts. One tensor, no terms.

    Reference: NetsPresso Trainer ``SegCrossEntropyLoss`` (losses/segmentation/seg_cross_entropy.py);
    ``torch.nn.CrossEntropyLoss``.
    """

    name: ClassVar[str] = NAME
    Config = SegCrossEntropyConfig
    inputs: ClassVar[Mapping[str, str]] = {
        "pred": "(B, C, h, w) logits at any resolution (SegFormer: 1/4 of the labels), any floating dtype",
    }
    targets: ClassVar[Mapping[str, str]] = {
        "target": "(B, H, W) integer labels in [0, C) or ignore_index",
    }

    class_weights: Tensor | None

    def __init__(self, config: SegCrossEntropyConfig | None = None, /, **fields: Any) -> None:
        super().__init__(config, **fields)
        self.register_config_buffer("class_weights", self.config.class_weights, dtype=torch.float64)

    def forward(self, out: Mapping[str, Any], target: Mapping[str, Any]) -> Tensor:
        pred = get_tensor(
            out, "pred", criterion=NAME, side="out", expected=self.inputs["pred"], float_only=True
        )
        labels = get_tensor(target, "target", criterion=NAME, side="target", expected=self.targets["target"])
        c = self.config
        return seg_cross_entropy(
            pred,
            labels,
            ignore_index=c.ignore_index,
            label_smoothing=c.label_smoothing,
            class_weights=self.class_weights,
            align_corners=c.align_corners,
            normalize_across_ranks=c.normalize_across_ranks,
        )

    def example(
        self,
        batch_size: int = 2,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Logits at 1/4 of a ``(B, 32, 48)`` label map of rectangles on background (4 classes, or as
        many as ``class_weights``), with a padded strip of ``ignore_index`` at the bottom."""
        classes = 4 if self.config.class_weights is None else len(self.config.class_weights)
        height, width = 32, 48
        labels = torch.zeros(batch_size, height, width, dtype=torch.int64)
        corners = torch.randint(0, 20, (batch_size, 4), generator=generator)
        kinds = torch.randint(1, max(classes, 2), (batch_size,), generator=generator) % classes
        for i in range(batch_size):
            y, x, dy, dx = (int(v) for v in corners[i])
            labels[i, y : y + 6 + dy // 2, x : x + 8 + dx] = int(kinds[i])
        ignore = self.config.ignore_index
        if not 0 <= ignore < classes:
            labels[:, -2:] = ignore  # padding, as random crops produce
        pred = torch.randn(batch_size, classes, height // 4, width // 4, generator=generator)
        return {"pred": pred.to(device).requires_grad_()}, {"target": labels.to(device)}
