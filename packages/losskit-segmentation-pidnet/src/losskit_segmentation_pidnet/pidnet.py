# SPDX-License-Identifier: Apache-2.0
"""``pidnet_loss``: the training loss of PIDNet (P, I and D branches), without its NaNs.

Functional form :func:`pidnet_loss`; criterion :class:`PIDNetLoss` (registered as ``pidnet_loss``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from losskit import Criterion, InputError, LossTerms, option
from losskit.checks import check_same_device, explain_non_finite, fmt_shape, get_tensor, value_checks_enabled
from losskit.dist import global_mean
from losskit.tensors import autocast_off, graph_zero
from losskit_ops import resize2d, upsampled_nll
from losskit_segmentation_pidnet._boundary import balanced_bce
from losskit_segmentation_pidnet._ohem import ohem_mask

__all__ = ["PIDNetLoss", "PIDNetLossConfig", "pidnet_loss"]

NAME = "pidnet_loss"
TERMS = ("ce", "boundary", "boundary_ce")
DIAGNOSTICS = ("ce_p", "ce_i", "valid_pixels", "ce_i_pixels", "boundary_ce_pixels")


def _normaliser(total: Tensor, enabled: bool) -> Tensor:
    """``total`` (averaged over ranks when ``enabled``), with 0 replaced by 1 (an empty term stays 0)."""
    total = global_mean(total, enabled=enabled, min=None)
    return torch.where(total > 0, total, torch.ones_like(total))


def _check_logits(x: Tensor, key: str, *, channels: int | None, like: Tensor | None) -> None:
    where = f"out[{key!r}]"
    if not x.is_floating_point():
        raise InputError(NAME, where, f"expected floating-point logits, got {x.dtype}")
    if x.dim() != 4:
        raise InputError(NAME, where, f"expected a 4-D (B, C, h, w) tensor, got shape {fmt_shape(x.shape)}")
    if like is None:
        if x.shape[1] < 1 or x.shape[2] < 1 or x.shape[3] < 1:
            raise InputError(
                NAME, where, f"expected (B, C, h, w) with C, h, w >= 1, got shape {fmt_shape(x.shape)}"
            )
        return
    want = (like.shape[0], like.shape[1] if channels is None else channels, like.shape[2], like.shape[3])
    if channels is None and x.shape[1] != like.shape[1]:
        raise InputError(
            NAME,
            where,
            f"expected {like.shape[1]} classes like out['pred'] {fmt_shape(like.shape)}, got shape {fmt_shape(x.shape)}",
        )
    if channels == 1 and x.shape[1] != 1:
        raise InputError(
            NAME,
            where,
            f"expected one boundary channel, shape {fmt_shape(want)}, got shape {fmt_shape(x.shape)}",
        )
    if tuple(x.shape) != want:
        raise InputError(
            NAME,
            where,
            f"expected shape {fmt_shape(want)} (batch and spatial size of out['pred']), got shape {fmt_shape(x.shape)}",
        )


def _check_inputs(
    pred: Tensor,
    extra_p: Tensor,
    extra_d: Tensor,
    target: Tensor,
    bd_gt: Tensor,
    ignore_index: int,
    num_class_weights: int | None,
) -> None:
    _check_logits(pred, "pred", channels=None, like=None)
    _check_logits(extra_p, "extra_p", channels=None, like=pred)
    _check_logits(extra_d, "extra_d", channels=1, like=pred)
    check_same_device(
        NAME,
        ("out['pred']", pred),
        ("out['extra_p']", extra_p),
        ("out['extra_d']", extra_d),
        ("target['target']", target),
        ("target['bd_gt']", bd_gt),
    )
    batch, classes = pred.shape[:2]
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise InputError(NAME, "target['target']", f"expected integer class labels, got {target.dtype}")
    if target.dim() != 3 or target.shape[0] != batch:
        raise InputError(
            NAME,
            "target['target']",
            f"expected (B, H, W) labels with B = {batch} (from out['pred']), got shape {fmt_shape(target.shape)}",
        )
    if bd_gt.is_complex() or tuple(bd_gt.shape) != tuple(target.shape):
        raise InputError(
            NAME,
            "target['bd_gt']",
            f"expected a real (B, H, W) boundary map shaped like target['target'] {fmt_shape(target.shape)}, "
            f"got {bd_gt.dtype} of shape {fmt_shape(bd_gt.shape)}",
        )
    if num_class_weights is not None and num_class_weights != classes:
        raise InputError(
            NAME,
            "out['pred']",
            f"class_weights has {num_class_weights} entries but the logits have {classes} classes "
            f"(shape {fmt_shape(pred.shape)})",
        )
    if not value_checks_enabled(pred):
        return
    err = explain_non_finite(
        NAME, [("out['pred']", pred), ("out['extra_p']", extra_p), ("out['extra_d']", extra_d)]
    )
    if err is not None:
        raise err
    bad = (target != ignore_index) & ((target < 0) | (target >= classes))
    if bool(bad.any()):
        example = int(target[bad][0])
        raise InputError(
            NAME,
            "target['target']",
            f"labels must lie in [0, {classes}) or equal ignore_index={ignore_index}; "
            f"found {example!r} ({int(bad.sum())} pixels)",
        )
    if bd_gt.dtype != torch.bool:
        bad_bd = (bd_gt != 0) & (bd_gt != 1)
        if bool(bad_bd.any()):
            example_bd = bd_gt[bad_bd][0].item()
            raise InputError(NAME, "target['bd_gt']", f"expected values in {{0, 1}}, found {example_bd!r}")


@dataclass(frozen=True)
class PIDNetLossConfig:
    """Fields of ``pidnet_loss``; defaults are PIDNet's values (its Cityscapes recipe also sets ``ohem``)."""

    ignore_index: int = option(255, doc="Label value of pixels that are ignored (no loss, not counted).")
    balance_weights: tuple[float, float] = option(
        (0.4, 1.0), ge=0.0, doc="Weights of the P-branch and I-branch cross-entropies in `ce`."
    )
    boundary_weight: float = option(
        20.0, ge=0.0, doc="Weight of the class-balanced boundary BCE (`boundary`)."
    )
    boundary_ce_weight: float = option(
        1.0, ge=0.0, doc="Weight of the boundary-aware cross-entropy (`boundary_ce`; upstream SB_WEIGHTS)."
    )
    boundary_threshold: float = option(
        0.8, ge=0.0, le=1.0, doc="Pixels with sigmoid(up(extra_d)) above this enter `boundary_ce`."
    )
    class_weights: tuple[float, ...] | None = option(
        None, ge=0.0, min_items=1, doc="Per-class CE weights (one per class), or null for none."
    )
    align_corners: bool = option(
        True, doc="align_corners of the bilinear resizing of all logits to label size."
    )
    ohem: bool = option(
        False, doc="Online hard example mining for the I-branch CE and `boundary_ce` (upstream USE_OHEM)."
    )
    ohem_thresh: float = option(
        0.9,
        ge=0.0,
        le=1.0,
        doc="OHEM keeps pixels whose true-class probability is below max(this, the ohem_min_kept cutoff).",
    )
    ohem_min_kept: int = option(
        131072,
        ge=1,
        doc="OHEM raises its threshold to the (ohem_min_kept+1)-th smallest probability in the batch.",
    )
    normalize_across_ranks: bool = option(
        False, doc="Divide by counts averaged over torch.distributed ranks (global normalisation under DDP)."
    )


def pidnet_loss(
    pred: Tensor,
    extra_p: Tensor | None,
    extra_d: Tensor | None,
    target: Tensor | None,
    bd_gt: Tensor | None,
    *,
    ignore_index: int = PIDNetLossConfig.ignore_index,
    balance_weights: tuple[float, float] = PIDNetLossConfig.balance_weights,
    boundary_weight: float = PIDNetLossConfig.boundary_weight,
    boundary_ce_weight: float = PIDNetLossConfig.boundary_ce_weight,
    boundary_threshold: float = PIDNetLossConfig.boundary_threshold,
    class_weights: Sequence[float] | Tensor | None = PIDNetLossConfig.class_weights,
    align_corners: bool = PIDNetLossConfig.align_corners,
    ohem: bool = PIDNetLossConfig.ohem,
    ohem_thresh: float = PIDNetLossConfig.ohem_thresh,
    ohem_min_kept: int = PIDNetLossConfig.ohem_min_kept,
    normalize_across_ranks: bool = PIDNetLossConfig.normalize_across_ranks,
) -> LossTerms:
    """The PIDNet loss as named terms ``ce``, ``boundary``, ``boundary_ce`` (their sum is the loss).

    All logits are resized bilinearly to the label size ``(H, W)`` (``up``). With ``CE`` the
    cross-entropy averaged over non-ignored pixels (weighted by ``class_weights[label]`` if given, then
    divided by the sum of those weights, as ``F.cross_entropy``):

    * ``ce = balance_weights[0] * CE(up(extra_p), target) + balance_weights[1] * CE(up(pred), target)``;
    * ``boundary = boundary_weight * sum_i w_i * BCE(up(extra_d)_i, bd_gt_i) / (B * H * W)``, with
      ``w_i = #neg / (#pos + #neg)`` on pixels where ``bd_gt == 1`` and ``#pos / (#pos + #neg)`` where
      ``bd_gt == 0``; counts over the whole batch;
    * ``boundary_ce = boundary_ce_weight * CE(up(pred), target)`` over the pixels where also
      ``sigmoid(up(extra_d)) > boundary_threshold``.

    With ``ohem``, the I-branch CE and ``boundary_ce`` use OHEM (see ``_ohem``): the mean of the
    (class-weighted) pixel losses over the kept pixels, divided by their count. The P branch keeps the
    plain CE, as upstream. An empty average (no valid pixel, no pixel past the boundary threshold,
    nothing kept) is 0 with the graph intact. Inputs are never modified.

    Args:
        pred: ``(B, C, h, w)`` I-branch logits.
        extra_p: ``(B, C, h, w)`` P-branch logits, or None (inference head): every term is then a
            graph-connected 0 and the targets are not read.
        extra_d: ``(B, 1, h, w)`` D-branch boundary logits.
        target: ``(B, H, W)`` integer labels in ``[0, C)`` or ``ignore_index`` (may be None when
            ``extra_p`` is None).
        bd_gt: ``(B, H, W)`` boundary map in {0, 1} (bool, integer or float; idem).
        normalize_across_ranks: divide by the mean over ranks of every count (valid pixels, class-balance
            counts, all pixels, OHEM kept pixels) when ``torch.distributed`` is initialised.

    Returns:
        :class:`losskit.LossTerms` with the terms above and diagnostics ``ce_p``, ``ce_i`` (the
        unweighted branch CEs), ``valid_pixels``, ``ce_i_pixels`` and ``boundary_ce_pixels`` (pixel
        counts of this process's batch entering each average).

    Raises:
        losskit.InputError: malformed inputs (shapes, dtypes; on CPU also labels out of range,
            non-finite logits, ``bd_gt`` values other than 0/1).

    Reference: Xu et al., "PIDNet: A Real-time Semantic Segmentation Network Inspired by PID
    Controllers", CVPR 2023.
    """
    if extra_p is None:
        _check_logits(pred, "pred", channels=None, like=None)
        zero = graph_zero(pred, extra_d)
        terms = {name: zero for name in TERMS}
        diagnostics = {name: torch.zeros((), device=pred.device) for name in DIAGNOSTICS}
        return LossTerms(terms, diagnostics)
    if extra_d is None:
        raise InputError(
            NAME, "out['extra_d']", "missing (None) while out['extra_p'] is given; expected (B, 1, h, w)"
        )
    if target is None:
        raise InputError(NAME, "target['target']", "missing (None); expected (B, H, W) integer labels")
    if bd_gt is None:
        raise InputError(NAME, "target['bd_gt']", "missing (None); expected a (B, H, W) boundary map")
    if class_weights is None:
        num_weights = None
    else:
        num_weights = class_weights.numel() if isinstance(class_weights, Tensor) else len(class_weights)
    _check_inputs(pred, extra_p, extra_d, target, bd_gt, ignore_index, num_weights)
    batch = pred.shape[0]
    height, width = target.shape[-2:]
    device = pred.device
    if batch * height * width == 0:
        zero = graph_zero(pred, extra_p, extra_d)
        diagnostics = {name: torch.zeros((), device=device) for name in DIAGNOSTICS}
        return LossTerms({name: zero for name in TERMS}, diagnostics)
    dtype = torch.float64 if torch.float64 in (pred.dtype, extra_p.dtype, extra_d.dtype) else torch.float32
    with autocast_off(device.type):
        px = _pixel_losses(
            pred, extra_p, target, ignore_index, class_weights, dtype, align_corners, normalize_across_ranks
        )
        bce, prob_d = _boundary_bce(extra_d, bd_gt, dtype, align_corners, normalize_across_ranks)
        selected = px.valid & (prob_d[:, 0] > boundary_threshold)
        mining = {"thresh": ohem_thresh, "min_kept": ohem_min_kept} if ohem else None
        ce_i, ce_i_pixels = _i_branch_ce(px, px.valid, mining, px.denom, normalize_across_ranks)
        sb, sb_pixels = _i_branch_ce(px, selected, mining, None, normalize_across_ranks)
        ce = balance_weights[0] * px.ce_p + balance_weights[1] * ce_i
        boundary = boundary_weight * bce
        boundary_ce = boundary_ce_weight * sb
    terms = {"ce": ce, "boundary": boundary, "boundary_ce": boundary_ce}
    diagnostics = {
        "ce_p": px.ce_p.detach().float(),
        "ce_i": ce_i.detach().float(),
        "valid_pixels": px.n_valid.float(),
        "ce_i_pixels": ce_i_pixels.float(),
        "boundary_ce_pixels": sb_pixels.float(),
    }
    return LossTerms(terms, diagnostics)


@dataclass(frozen=True)
class _PixelLosses:
    """Per-pixel cross-entropies of both branches at label resolution, and what averages them."""

    valid: Tensor  # (B, H, W) bool: label in [0, C), not ignore_index
    n_valid: Tensor  # count of valid pixels
    weight: Tensor | None  # (B, H, W) class weight of each pixel's label (0 where not valid), or None
    wnll_i: Tensor  # (B, H, W) I-branch NLL times the pixel's class weight
    nll_i: Tensor  # (B, H, W) I-branch NLL (unweighted; OHEM ranks pixels by exp(-nll_i))
    ce_p: Tensor  # the P branch's mean CE over the valid pixels (class-weighted)
    denom: Tensor  # the CE normaliser: class-weight sum (or count) of the valid pixels, > 0


def _pixel_losses(
    pred: Tensor,
    extra_p: Tensor,
    target: Tensor,
    ignore_index: int,
    class_weights: Sequence[float] | Tensor | None,
    dtype: torch.dtype,
    align_corners: bool,
    normalize_across_ranks: bool,
) -> _PixelLosses:
    """The CE part: both branches' NLL of bilinearly upsampled logits, the P branch's mean."""
    classes = pred.shape[1]
    target = target.long()
    valid = (target != ignore_index) & (target >= 0) & (target < classes)
    labels = torch.where(valid, target, 0)
    n_valid = torch.count_nonzero(valid)
    nll_p = upsampled_nll(extra_p.to(dtype), labels, valid, align_corners=align_corners)
    nll_i = upsampled_nll(pred.to(dtype), labels, valid, align_corners=align_corners)
    if class_weights is None:
        pixel_weight: Tensor | None = None
        valid_weight = n_valid.to(dtype)
        wnll_p, wnll_i = nll_p, nll_i
    else:
        cw = torch.as_tensor(class_weights, dtype=dtype).to(device=pred.device, non_blocking=True)
        pixel_weight = cw[labels] * valid
        valid_weight = pixel_weight.sum()
        wnll_p, wnll_i = nll_p * pixel_weight, nll_i * pixel_weight
    denom = _normaliser(valid_weight, normalize_across_ranks)
    return _PixelLosses(valid, n_valid, pixel_weight, wnll_i, nll_i, wnll_p.sum() / denom, denom)


def _boundary_bce(
    extra_d: Tensor, bd_gt: Tensor, dtype: torch.dtype, align_corners: bool, normalize_across_ranks: bool
) -> tuple[Tensor, Tensor]:
    """The boundary part: the D branch's class-balanced BCE over every pixel (unweighted) and the
    boundary probability map ``sigmoid(up(extra_d))`` ``(B, 1, H, W)`` (no gradient)."""
    batch, (height, width) = bd_gt.shape[0], bd_gt.shape[-2:]
    d_up = resize2d(extra_d.to(dtype), (height, width), align_corners=align_corners)
    bd = bd_gt.unsqueeze(1)
    positive = bd if bd.dtype == torch.bool else bd == 1
    negative = ~bd if bd.dtype == torch.bool else bd == 0
    n_pos = global_mean(torch.count_nonzero(positive).to(dtype), enabled=normalize_across_ranks, min=None)
    n_neg = global_mean(torch.count_nonzero(negative).to(dtype), enabled=normalize_across_ranks, min=None)
    n_all = _normaliser(
        torch.full((), batch * height * width, dtype=dtype, device=extra_d.device), normalize_across_ranks
    )
    return balanced_bce(d_up, positive, negative, n_pos, n_neg, n_all)


def _i_branch_ce(
    px: _PixelLosses,
    pixels: Tensor,
    mining: dict[str, Any] | None,
    denom: Tensor | None,
    normalize_across_ranks: bool,
) -> tuple[Tensor, Tensor]:
    """The I branch's mean CE over ``pixels`` (all valid ones for ``ce``, those past the boundary
    threshold for ``boundary_ce``) and the count of pixels it averages.

    Without OHEM (``mining`` None) it is divided by the class-weight sum of ``pixels`` (``denom`` when
    the caller has it); with OHEM, by the number of pixels OHEM keeps among them.
    """
    if mining is not None:
        keep = ohem_mask(torch.exp(-px.nll_i.detach()), pixels, **mining)
        n_keep = torch.count_nonzero(keep)
        loss = torch.where(keep, px.wnll_i, 0.0).sum() / _normaliser(
            n_keep.to(px.wnll_i.dtype), normalize_across_ranks
        )
        return loss, n_keep
    if denom is not None:  # every valid pixel: px.denom, computed once for both branches
        return px.wnll_i.sum() / denom, px.n_valid
    n_selected = torch.count_nonzero(pixels)
    weight = n_selected.to(px.wnll_i.dtype) if px.weight is None else (px.weight * pixels).sum()
    loss = torch.where(pixels, px.wnll_i, 0.0).sum() / _normaliser(weight, normalize_across_ranks)
    return loss, n_selected


class PIDNetLoss(Criterion[PIDNetLossConfig]):
    """PIDNet loss: P/I-branch cross-entropy, class-balanced boundary BCE and boundary-aware CE.

    ``loss = ce + boundary + boundary_ce`` (the functional ``pidnet_loss`` documents each term's exact
    reduction).
    Every logit map is bilinearly resized to the label size; the full-resolution logits are never
    materialised as a whole (banded, recomputed in backward), so the loss is faster and leaner than the
    reference while matching it. Empty terms are 0 (never NaN), inputs are never modified.

    Inputs: ``out["pred"]`` ``(B, C, h, w)``, ``out["extra_p"]`` ``(B, C, h, w)`` (absent or None: the
    loss is a graph-connected 0), ``out["extra_d"]`` ``(B, 1, h, w)``; targets ``target["target"]``
    ``(B, H, W)`` integer labels, ``target["bd_gt"]`` ``(B, H, W)`` in {0, 1}.

    Reference: Xu et al., "PIDNet: A Real-time Semantic Segmentation Network Inspired by PID
    Controllers", CVPR 2023 (https://github.com/XuJiacong/PIDNet).
    """

    name = NAME
    Config = PIDNetLossConfig
    inputs = {
        "pred": "(B, C, h, w) I-branch logits",
        "extra_p": "(B, C, h, w) P-branch logits; absent or None in inference: the loss is 0",
        "extra_d": "(B, 1, h, w) D-branch boundary logits",
    }
    targets = {
        "target": "(B, H, W) integer labels in [0, C) or ignore_index",
        "bd_gt": "(B, H, W) boundary map in {0, 1} (bool, integer or float)",
    }
    terms = TERMS
    diagnostics = DIAGNOSTICS

    config: PIDNetLossConfig

    def __init__(self, config: PIDNetLossConfig | None = None, /, **fields: Any) -> None:
        super().__init__(config, **fields)
        self.class_weights: Tensor | None
        self.register_config_buffer("class_weights", self.config.class_weights, dtype=torch.float64)

    def forward(self, out: Mapping[str, Any], target: Mapping[str, Any]) -> LossTerms:
        pred = get_tensor(
            out, "pred", criterion=NAME, side="out", expected=self.inputs["pred"], float_only=True
        )
        extra_p = out.get("extra_p")
        if extra_p is None:
            extra_d = out.get("extra_d")
            return pidnet_loss(pred, None, extra_d if isinstance(extra_d, Tensor) else None, None, None)
        extra_p = get_tensor(
            out, "extra_p", criterion=NAME, side="out", expected=self.inputs["extra_p"], float_only=True
        )
        extra_d = get_tensor(
            out, "extra_d", criterion=NAME, side="out", expected=self.inputs["extra_d"], float_only=True
        )
        labels = get_tensor(target, "target", criterion=NAME, side="target", expected=self.targets["target"])
        bd_gt = get_tensor(target, "bd_gt", criterion=NAME, side="target", expected=self.targets["bd_gt"])
        c = self.config
        return pidnet_loss(
            pred,
            extra_p,
            extra_d,
            labels,
            bd_gt,
            ignore_index=c.ignore_index,
            balance_weights=c.balance_weights,
            boundary_weight=c.boundary_weight,
            boundary_ce_weight=c.boundary_ce_weight,
            boundary_threshold=c.boundary_threshold,
            class_weights=self.class_weights,
            align_corners=c.align_corners,
            ohem=c.ohem,
            ohem_thresh=c.ohem_thresh,
            ohem_min_kept=c.ohem_min_kept,
            normalize_across_ranks=c.normalize_across_ranks,
        )

    def example(
        self,
        batch_size: int = 2,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Logits at 1/4 of a ``(B, 32, 48)`` label map of rectangles on background, 4 classes."""
        classes = 4 if self.config.class_weights is None else len(self.config.class_weights)
        h, w, height, width = 8, 12, 32, 48
        labels = torch.zeros(batch_size, height, width, dtype=torch.int64)
        corners = torch.randint(0, 20, (batch_size, 4), generator=generator)
        kinds = torch.randint(1, max(classes, 2), (batch_size,), generator=generator) % classes
        for i in range(batch_size):
            y, x, dy, dx = (int(v) for v in corners[i])
            labels[i, y : y + 6 + dy // 2, x : x + 8 + dx] = int(kinds[i])
        edge = torch.zeros_like(labels, dtype=torch.bool)
        edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
        edge[:, :, 1:] |= labels[:, :, 1:] != labels[:, :, :-1]
        ignore = self.config.ignore_index
        if not 0 <= ignore < classes:
            labels[:, -2:] = ignore  # a padded strip, as random crops produce
        out = {
            "pred": torch.randn(batch_size, classes, h, w, generator=generator),
            "extra_p": torch.randn(batch_size, classes, h, w, generator=generator),
            "extra_d": torch.randn(batch_size, 1, h, w, generator=generator),
        }
        out = {k: v.to(device).requires_grad_() for k, v in out.items()}
        target = {"target": labels.to(device), "bd_gt": edge.float().to(device)}
        return out, target
