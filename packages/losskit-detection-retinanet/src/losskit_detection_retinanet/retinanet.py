# SPDX-License-Identifier: Apache-2.0
"""RetinaNet's training loss, batched over images: ``retinanet_loss`` and ``RetinaNetLoss``.

Reference: Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017
(https://arxiv.org/abs/1708.02002); torchvision's ``RetinaNet.compute_loss`` is the parity reference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import complete_box_iou_loss, distance_box_iou_loss, generalized_box_iou_loss

from losskit import Criterion, InputError, LossTerms, option
from losskit.checks import (
    check_same_device,
    explain_non_finite,
    fmt_shape,
    get_box_targets,
    missing_key_error,
    value_checks_enabled,
)
from losskit.dist import global_mean
from losskit.tensors import autocast_off, graph_zero
from losskit_detection_retinanet._match import BACKGROUND, IGNORED, match_anchors, prepare_gt, safe_anchors
from losskit_ops import decode_deltas, encode_deltas, sigmoid_focal_loss_indexed

__all__ = ["RetinaNetLoss", "RetinaNetLossConfig", "RetinaNetLossOutput", "retinanet_loss"]

BoxLoss = Literal["l1", "smooth_l1", "giou", "diou", "ciou"]
Normalizer = Literal["image", "batch"]

_IOU_LOSSES = {
    "giou": generalized_box_iou_loss,
    "diou": distance_box_iou_loss,
    "ciou": complete_box_iou_loss,
}


@dataclass(frozen=True)
class RetinaNetLossConfig:
    """The fields of ``retinanet_loss`` (``RetinaNetLoss.Config``): the one place their defaults live."""

    alpha: float = option(
        0.25,
        ge=0.0,
        le=1.0,
        negative_disables=True,
        doc="Focal weight of the positive class (1 - alpha for negatives); negative: no weighting.",
    )
    gamma: float = option(2.0, ge=0.0, doc="Focal modulating exponent.")
    fg_iou_thresh: float = option(
        0.5, ge=0.0, le=1.0, doc="An anchor whose best IoU with a gt is at least this is foreground."
    )
    bg_iou_thresh: float = option(
        0.4,
        ge=0.0,
        le=1.0,
        doc="An anchor whose best IoU is below this is background; between the two it is ignored.",
    )
    allow_low_quality_matches: bool = option(
        True, doc="Each gt's highest-IoU anchors (ties included) are foreground even below fg_iou_thresh."
    )
    box_loss: Literal["l1", "smooth_l1", "giou", "diou", "ciou"] = option(
        "l1",
        doc="Box term: l1 / smooth_l1 on encoded deltas, or giou / diou / ciou on decoded boxes.",
    )
    beta: float = option(1.0, ge=0.0, doc="Smooth-L1 transition point (box_loss smooth_l1 only).")
    eps: float = option(1e-7, gt=0.0, doc="Stabiliser of the IoU box losses (giou, diou, ciou only).")
    bbox_weights: tuple[float, float, float, float] = option(
        (1.0, 1.0, 1.0, 1.0), gt=0.0, doc="Box-coder weights (wx, wy, ww, wh) of the encoded deltas."
    )
    bbox_xform_clip: float = option(
        math.log(1000.0 / 16),
        gt=0.0,
        doc="Clamp of dw, dh to [-clip, clip] before exp when decoding (IoU box losses only).",
    )
    normalizer: Literal["image", "batch"] = option(
        "image",
        doc="image: each image's sum / max(1, its foreground anchors), mean over images (torchvision); "
        "batch: the batch's sum / max(1, its foreground anchors).",
    )
    normalize_across_ranks: bool = option(
        False,
        doc="With normalizer batch: average the foreground count over data-parallel ranks "
        "(all-reduce) before it divides; no effect with normalizer image or in one process.",
    )

    def validate(self) -> list[tuple[str, str]]:
        if self.bg_iou_thresh > self.fg_iou_thresh:
            return [
                (
                    "bg_iou_thresh",
                    f"{self.bg_iou_thresh!r} is above fg_iou_thresh {self.fg_iou_thresh!r}; "
                    "it must be <= fg_iou_thresh",
                )
            ]
        return []


class RetinaNetLossOutput(NamedTuple):
    """What :func:`retinanet_loss` returns.

    Attributes:
        classification: focal term, a scalar with gradients.
        bbox_regression: box term, a scalar with gradients.
        num_fg: number of foreground anchors in the (local) batch, detached float scalar.
        num_ignored: number of ignored anchors (best IoU between the thresholds), detached float scalar.
        matches: ``(B, A)`` int64 matched gt index, -1 background, -2 ignored.
        invalid_targets: number of gts left out of matching (zero or negative width or height, non-finite
            box, or label outside ``[0, C)``), detached float scalar.
    """

    classification: Tensor
    bbox_regression: Tensor
    num_fg: Tensor
    num_ignored: Tensor
    matches: Tensor
    invalid_targets: Tensor


class _Targets(NamedTuple):
    """What the two terms need from matching (no gradients); ``(B, A)`` unless noted."""

    matches: Tensor
    fg: Tensor
    row_labels: Tensor  # class of the matched gt, BACKGROUND elsewhere
    cls_w: Tensor  # weight of each anchor's focal row: 0 when ignored
    box_w: Tensor  # weight of each anchor's box loss: 0 unless foreground
    anchors_flat: Tensor  # (B * A, 4) reference boxes: the anchor (a unit box for invalid anchors)
    matched_flat: Tensor  # (B * A, 4) the matched gt box; the reference box itself off foreground
    num_fg_img: Tensor  # (B,) foreground anchors per image
    num_invalid: Tensor  # scalar: gts left out of matching


def _as_levels(x: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [x] if isinstance(x, Tensor) else list(x)


def _matching_dtype(anchors: Tensor, boxes: Sequence[Tensor]) -> torch.dtype:
    """At least float32; float64 when anchors or boxes are float64 (as torch's type promotion)."""
    dtype = torch.promote_types(anchors.dtype, torch.float32)
    for b in boxes:
        dtype = torch.promote_types(dtype, b.dtype)
    return dtype


def _image_weights(
    num_fg_img: Tensor, b: int, wdtype: torch.dtype, normalizer: Normalizer, normalize_across_ranks: bool
) -> Tensor:
    """``(B,)`` the factor of each image's sums (see :func:`retinanet_loss`, reduction)."""
    if normalizer == "image":
        return 1.0 / (b * num_fg_img.clamp(min=1).to(wdtype))
    count = global_mean(num_fg_img.sum().to(wdtype), enabled=normalize_across_ranks, min=1.0)
    return (1.0 / count.to(wdtype)).expand(b)


@torch.no_grad()
def _targets(
    anchors: Tensor,
    gt_boxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    *,
    num_classes: int,
    wdtype: torch.dtype,
    device: torch.device,
    fg_iou_thresh: float,
    bg_iou_thresh: float,
    allow_low_quality_matches: bool,
    normalizer: Normalizer,
    normalize_across_ranks: bool,
) -> _Targets:
    """Matching, then each anchor's class, weights and box pair (fixed shapes, no host sync)."""
    mdtype = _matching_dtype(anchors, gt_boxes)
    gt = prepare_gt(gt_boxes, gt_labels, num_classes=num_classes, dtype=mdtype, device=device)
    anchors_m = anchors.detach().to(mdtype)
    matches = match_anchors(
        gt.boxes,
        gt.valid,
        anchors_m,
        fg_iou_thresh=fg_iou_thresh,
        bg_iou_thresh=bg_iou_thresh,
        allow_low_quality_matches=allow_low_quality_matches,
        counts=gt.counts,
    )
    b, a = matches.shape
    fg = matches >= 0
    num_fg_img = fg.sum(dim=1)
    img_w = _image_weights(num_fg_img, b, wdtype, normalizer, normalize_across_ranks)
    gt_index = matches.clamp(min=0)
    if gt.boxes.shape[1] > 0:
        row_labels = torch.where(fg, gt.labels.gather(1, gt_index), BACKGROUND)
    else:
        row_labels = torch.full_like(matches, BACKGROUND)
    cls_w = torch.where(matches != IGNORED, img_w[:, None], 0.0)
    box_w = torch.where(fg, img_w[:, None], 0.0)

    # an invalid anchor (never foreground) is replaced by a unit box: a finite, zero box target
    _, ok = safe_anchors(anchors_m)
    unit = (torch.arange(4, device=device) >= 2).to(mdtype)  # (0, 0, 1, 1), made on the device
    safe = torch.where(ok[..., None], anchors_m, unit)
    anchors_b = safe.expand(b, a, 4) if safe.dim() == 2 else safe
    if gt.boxes.shape[1] > 0:
        matched = gt.boxes.gather(1, gt_index[:, :, None].expand(b, a, 4))
        # non-foreground anchors are paired with themselves: a finite, zero target
        matched = torch.where(fg[:, :, None], matched, anchors_b)
    else:
        matched = anchors_b
    return _Targets(
        matches,
        fg,
        row_labels,
        cls_w,
        box_w,
        anchors_b.reshape(-1, 4),
        matched.reshape(-1, 4),
        num_fg_img,
        gt.num_invalid,
    )


def _classification_term(cls_levels: list[Tensor], t: _Targets, *, alpha: float, gamma: float) -> Tensor:
    """Sparse focal loss, level by level on views (no concatenated copy of the logits)."""
    c = cls_levels[0].shape[2]
    term: Tensor | None = None
    start = 0
    for level in cls_levels:
        n = level.shape[1]
        pred = level.reshape(-1, c)
        if pred.numel() == 0:
            part = graph_zero(level)
        else:
            part = sigmoid_focal_loss_indexed(
                pred,
                t.row_labels[:, start : start + n].reshape(-1),
                alpha=alpha,
                gamma=gamma,
                weight=t.cls_w[:, start : start + n].reshape(-1),
                reduction="sum",
            )
        term = part if term is None else term + part
        start += n
    if term is None:  # pragma: no cover - callers always pass at least one level
        raise ValueError("cls_logits: no level given")
    return term


def _clamp_size_deltas(deltas: Tensor, weights: tuple[float, float, float, float], clip: float) -> Tensor:
    """``dw / ww`` and ``dh / wh`` clamped to at least ``-clip`` (``decode_deltas`` clamps at most ``clip``):
    a decoded box never shrinks below ``exp(-clip)`` of its anchor (1/62.5 at the default), so the IoU
    losses stay finite. Values in range are returned unchanged."""
    _, _, ww, wh = weights
    return torch.cat(
        (deltas[:, :2], deltas[:, 2:3].clamp(min=-clip * ww), deltas[:, 3:4].clamp(min=-clip * wh)), dim=1
    )


def _box_term(
    reg_levels: list[Tensor],
    t: _Targets,
    *,
    box_loss: BoxLoss,
    beta: float,
    eps: float,
    bbox_weights: tuple[float, float, float, float],
    bbox_xform_clip: float,
) -> Tensor:
    """Box loss dense over anchors, masked to foreground (no data-dependent shapes, no host sync)."""
    reg = reg_levels[0] if len(reg_levels) == 1 else torch.cat(reg_levels, dim=1)
    b, a = t.fg.shape
    bdtype = torch.promote_types(reg.dtype, t.anchors_flat.dtype)
    pred_d = torch.where(t.fg[:, :, None], reg.to(bdtype), 0.0).reshape(-1, 4)
    if box_loss in ("l1", "smooth_l1"):
        target_d = encode_deltas(t.matched_flat, t.anchors_flat, bbox_weights)
        if box_loss == "l1":
            per = F.l1_loss(pred_d, target_d, reduction="none")
        else:
            per = F.smooth_l1_loss(pred_d, target_d, reduction="none", beta=beta)
        per_anchor = per.sum(dim=1)
    else:
        pred_d = _clamp_size_deltas(pred_d, bbox_weights, bbox_xform_clip)
        decoded = decode_deltas(pred_d, t.anchors_flat, bbox_weights, bbox_xform_clip)
        per_anchor = _IOU_LOSSES[box_loss](
            decoded, t.matched_flat.to(decoded.dtype), reduction="none", eps=eps
        )
    return (per_anchor.reshape(b, a) * t.box_w.to(per_anchor.dtype)).sum()


def retinanet_loss(
    cls_logits: Tensor | Sequence[Tensor],
    bbox_regression: Tensor | Sequence[Tensor],
    anchors: Tensor,
    gt_boxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    *,
    alpha: float = RetinaNetLossConfig.alpha,
    gamma: float = RetinaNetLossConfig.gamma,
    fg_iou_thresh: float = RetinaNetLossConfig.fg_iou_thresh,
    bg_iou_thresh: float = RetinaNetLossConfig.bg_iou_thresh,
    allow_low_quality_matches: bool = RetinaNetLossConfig.allow_low_quality_matches,
    box_loss: BoxLoss = RetinaNetLossConfig.box_loss,
    beta: float = RetinaNetLossConfig.beta,
    eps: float = RetinaNetLossConfig.eps,
    bbox_weights: tuple[float, float, float, float] = RetinaNetLossConfig.bbox_weights,
    bbox_xform_clip: float = RetinaNetLossConfig.bbox_xform_clip,
    normalizer: Normalizer = RetinaNetLossConfig.normalizer,
    normalize_across_ranks: bool = RetinaNetLossConfig.normalize_across_ranks,
) -> RetinaNetLossOutput:
    """RetinaNet's loss for a batch: IoU matching, focal classification, box regression.

    Matching follows torchvision's ``Matcher`` (see ``losskit_detection_retinanet._match``), for all
    images at once. The classification term is the sigmoid focal loss of every non-ignored anchor and
    every class against its one-hot target (all zeros for background), computed sparsely: one positive
    per foreground anchor, never a dense ``(B, A, C)`` target. The box term is ``box_loss`` between the
    predicted deltas and the matched gt encoded against its anchor (``l1``, ``smooth_l1``), or between
    the decoded prediction and the gt box (``giou``, ``diou``, ``ciou``), over foreground anchors.

    Inputs value checks would reject get a defined treatment instead (no host sync): a gt box with zero
    or negative width or height or a non-finite coordinate, or a label outside ``[0, C)``, is left out
    of matching as if absent (counted in ``invalid_targets``); an anchor with zero or negative width or
    height is background; ``dw``, ``dh`` are clamped to ``[-bbox_xform_clip, bbox_xform_clip]`` before
    ``exp`` when decoding (torchvision clamps the upper side only).

    Reduction, for both terms, with ``S_i`` the term's sum over image ``i`` and ``n_i`` its number of
    foreground anchors:

    * ``normalizer="image"`` (torchvision): ``(1 / B) * sum_i S_i / max(1, n_i)``;
    * ``normalizer="batch"``: ``sum_i S_i / max(1, N)``, ``N = sum_i n_i``; with
      ``normalize_across_ranks`` and an initialised process group, ``N`` is the mean over ranks of the
      ranks' ``N`` (all-reduced, clamped after), so that DDP's gradient averaging gives the gradient of
      ``sum S / max(1, sum n)`` over the global batch. ``normalize_across_ranks`` has no effect with
      ``"image"``, whose per-image normalisation is already the same on one or many ranks.

    Args:
        cls_logits: ``(B, A, C)`` logits, or a list over levels of ``(B, HWA_l, C)``; no background class.
        bbox_regression: ``(B, A, 4)`` deltas ``(dx, dy, dw, dh)``, or a list over levels of ``(B, HWA_l, 4)``.
        anchors: ``(A, 4)`` xyxy anchors in pixels shared by the images, or ``(B, A, 4)``; in the order of
            the head's outputs (levels concatenated).
        gt_boxes: B tensors ``(n_i, 4)`` xyxy in pixels; ``n_i`` may be 0.
        gt_labels: B integer tensors ``(n_i,)`` with classes in ``[0, C)``.
        alpha: focal weight of positives (``1 - alpha`` for negatives); negative: no weighting.
        gamma: focal modulating exponent.
        fg_iou_thresh: best IoU at or above it: foreground.
        bg_iou_thresh: best IoU below it: background; in between: ignored (no loss).
        allow_low_quality_matches: each gt's highest-IoU anchors (ties included) are foreground too.
        box_loss: ``l1``, ``smooth_l1`` (with ``beta``), or ``giou`` / ``diou`` / ``ciou`` (with ``eps``).
        beta: smooth-L1 transition point.
        eps: IoU-loss stabiliser.
        bbox_weights: box-coder weights ``(wx, wy, ww, wh)``.
        bbox_xform_clip: clamp of ``dw``, ``dh`` (both sides) when decoding for the IoU losses.
        normalizer: ``image`` or ``batch``, see above.
        normalize_across_ranks: average the batch foreground count over data-parallel ranks.

    Returns:
        a :class:`RetinaNetLossOutput`.
    """
    cls_levels = _as_levels(cls_logits)
    reg_levels = _as_levels(bbox_regression)
    device = cls_levels[0].device
    with autocast_off(device):
        t = _targets(
            anchors,
            gt_boxes,
            gt_labels,
            num_classes=cls_levels[0].shape[2],
            wdtype=torch.promote_types(cls_levels[0].dtype, torch.float32),
            device=device,
            fg_iou_thresh=fg_iou_thresh,
            bg_iou_thresh=bg_iou_thresh,
            allow_low_quality_matches=allow_low_quality_matches,
            normalizer=normalizer,
            normalize_across_ranks=normalize_across_ranks,
        )
        cls_term = _classification_term(cls_levels, t, alpha=alpha, gamma=gamma)
        box_term = _box_term(
            reg_levels,
            t,
            box_loss=box_loss,
            beta=beta,
            eps=eps,
            bbox_weights=bbox_weights,
            bbox_xform_clip=bbox_xform_clip,
        )
    return RetinaNetLossOutput(
        cls_term,
        box_term,
        t.num_fg_img.sum().to(torch.float32),
        (t.matches == IGNORED).sum().to(torch.float32),
        t.matches,
        t.num_invalid.to(torch.float32),
    )


class RetinaNetLoss(Criterion[RetinaNetLossConfig]):
    """RetinaNet's loss: focal classification and box regression of IoU-matched anchors.

    Anchors are matched to ground truths by IoU exactly as torchvision's ``Matcher``: best IoU at least
    ``fg_iou_thresh``: foreground (matched to that gt); below ``bg_iou_thresh``: background; in between:
    ignored; with ``allow_low_quality_matches``, each gt's highest-IoU anchors (ties included) are
    foreground too. ``classification`` is the sigmoid focal loss summed over the non-ignored anchors and
    all ``C`` classes against one-hot targets (all zeros for background), computed sparsely (no
    ``B x A x C`` target). ``bbox_regression`` is ``box_loss`` summed over the foreground anchors: L1 /
    smooth L1 between the predicted deltas and the matched gt encoded against its anchor, or the
    GIoU / DIoU / CIoU loss between the decoded prediction and the gt box.

    Reduction (both terms; ``n_i`` = foreground anchors of image ``i``, B = images):

    * ``normalizer: image`` (default, torchvision): each image's sum divided by ``max(1, n_i)``, then the
      mean over the B images. Under DDP (gradients averaged over ranks) this is already the gradient of
      the whole global batch when every rank holds B images; ``normalize_across_ranks`` has no effect.
    * ``normalizer: batch``: the batch's sum divided by ``max(1, sum_i n_i)``. With
      ``normalize_across_ranks`` and ``torch.distributed`` initialised, the count is the mean over ranks
      of each rank's count (all-reduced, clamped at 1 after), so the DDP-averaged gradient is that of
      ``sum / max(1, global foreground count)`` over the global batch; without it each rank divides by
      its own count.

    Diagnostics: ``num_fg`` and ``num_ignored``, anchors of the local batch, and ``invalid_targets``, gts
    of the local batch left out of matching. :meth:`match` returns the assignment ``(B, A)``: gt index,
    -1 background, -2 ignored.

    With value checks off (accelerators by default), what they would reject is treated without a host
    sync: a gt box with zero or negative width or height or a non-finite coordinate, or a label outside
    ``[0, C)``, is left out as if absent (counted in ``invalid_targets``); an anchor with zero or negative
    width or height is background; ``dw``, ``dh`` are clamped to ``[-bbox_xform_clip, bbox_xform_clip]``
    before ``exp`` for the IoU box losses. Inputs on different devices raise ``InputError`` naming both.

    Inputs:
        cls_logits: ``(B, A, C)`` or a list over levels of ``(B, HWA_l, C)`` logits (no background class).
        bbox_regression: ``(B, A, 4)`` or a list over levels of ``(B, HWA_l, 4)`` deltas.
        anchors: ``(A, 4)`` xyxy pixels shared by the images, or a list of B ``(A, 4)`` tensors.
        gt: list of B dicts ``{"boxes": (n_i, 4) xyxy pixels, "labels": (n_i,) int64}``.

    Reference: Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017,
    https://arxiv.org/abs/1708.02002; values and gradients of torchvision's ``RetinaNet.compute_loss``.
    """

    name: ClassVar[str] = "retinanet_loss"

    Config = RetinaNetLossConfig

    inputs: ClassVar[Mapping[str, str]] = {
        "cls_logits": "(B, A, C) logits, or a list over levels of (B, HWA_l, C); no background class",
        "bbox_regression": "(B, A, 4) box deltas (dx, dy, dw, dh), or a list over levels of (B, HWA_l, 4)",
        "anchors": "(A, 4) xyxy anchors in pixels, shared, in the head's order; or a list of B (A, 4)",
    }
    targets: ClassVar[Mapping[str, str]] = {
        "gt": "list of B dicts {'boxes': (n_i, 4) xyxy pixels, 'labels': (n_i,) int64 in [0, C)}; n_i may be 0",
    }
    terms: ClassVar[tuple[str, ...]] = ("classification", "bbox_regression")
    diagnostics: ClassVar[tuple[str, ...]] = ("num_fg", "num_ignored", "invalid_targets")

    # -- public API ------------------------------------------------------------------------------------

    def forward(self, out: Mapping[str, Any], target: Mapping[str, Any]) -> LossTerms:
        p = self._parse(out, target)
        cfg = self.config
        res = retinanet_loss(
            p.cls_levels,
            p.reg_levels,
            p.anchors,
            p.boxes,
            p.labels,
            alpha=cfg.alpha,
            gamma=cfg.gamma,
            fg_iou_thresh=cfg.fg_iou_thresh,
            bg_iou_thresh=cfg.bg_iou_thresh,
            allow_low_quality_matches=cfg.allow_low_quality_matches,
            box_loss=cfg.box_loss,
            beta=cfg.beta,
            eps=cfg.eps,
            bbox_weights=cfg.bbox_weights,
            bbox_xform_clip=cfg.bbox_xform_clip,
            normalizer=cfg.normalizer,
            normalize_across_ranks=cfg.normalize_across_ranks,
        )
        if p.check_values:
            self._check_finite(res, p)
        return LossTerms(
            {"classification": res.classification, "bbox_regression": res.bbox_regression},
            {
                "num_fg": res.num_fg.detach(),
                "num_ignored": res.num_ignored.detach(),
                "invalid_targets": res.invalid_targets.detach(),
            },
        )

    @torch.no_grad()
    def match(self, out: Mapping[str, Any], target: Mapping[str, Any]) -> Tensor:
        """The anchor assignment ``forward`` uses: ``(B, A)`` int64.

        Each entry is the index of the matched gt in ``target["gt"][b]["boxes"]``, -1 for background or
        -2 for ignored (best IoU between the thresholds), as torchvision's ``Matcher``.
        """
        p = self._parse(out, target)
        gt = prepare_gt(
            p.boxes,
            p.labels,
            num_classes=int(p.cls_levels[0].shape[2]),
            dtype=_matching_dtype(p.anchors, p.boxes),
            device=p.anchors.device,
        )
        return match_anchors(
            gt.boxes,
            gt.valid,
            p.anchors.to(gt.boxes.dtype),
            fg_iou_thresh=self.config.fg_iou_thresh,
            bg_iou_thresh=self.config.bg_iou_thresh,
            allow_low_quality_matches=self.config.allow_low_quality_matches,
            counts=gt.counts,
        )

    def example(
        self,
        batch_size: int = 2,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Two levels (strides 8 and 16) of 3 anchors per location on a 64 × 64 image, 3 classes."""
        num_classes = 3
        anchors = _grid_anchors(64, strides=(8, 16), sizes=(24.0, 48.0), ratios=(0.5, 1.0, 2.0))
        sizes = [(64 // s) ** 2 * 3 for s in (8, 16)]
        cls_logits = [
            (torch.randn(batch_size, n, num_classes, generator=generator) - 2.0).requires_grad_()
            for n in sizes
        ]
        bbox_regression = [
            (0.1 * torch.randn(batch_size, n, 4, generator=generator)).requires_grad_() for n in sizes
        ]
        gt = []
        for i in range(batch_size):
            n = (2, 1, 0)[i % 3]
            xy = torch.rand(n, 2, generator=generator) * 32.0
            wh = 12.0 + torch.rand(n, 2, generator=generator) * 20.0
            gt.append(
                {
                    "boxes": torch.cat([xy, xy + wh], dim=1),
                    "labels": torch.randint(0, num_classes, (n,), generator=generator),
                }
            )
        if device is not None:
            dev = torch.device(device)
            cls_logits = [t.detach().to(dev).requires_grad_() for t in cls_logits]
            bbox_regression = [t.detach().to(dev).requires_grad_() for t in bbox_regression]
            anchors = anchors.to(dev)
            gt = [{k: v.to(dev) for k, v in g.items()} for g in gt]
        return (
            {"cls_logits": cls_logits, "bbox_regression": bbox_regression, "anchors": anchors},
            {"gt": gt},
        )

    # -- input checks ----------------------------------------------------------------------------------

    def _levels(self, out: Any, key: str, expected: str, width: int | None) -> tuple[list[Tensor], bool]:
        name = self.name
        if not isinstance(out, Mapping):
            raise InputError(name, "out", f"expected a mapping with key {key!r}, got {type(out).__name__}")
        if key not in out:
            raise missing_key_error(name, "out", key, out, expected)
        value = out[key]
        if isinstance(value, Tensor):
            items, is_list = [value], False
        elif isinstance(value, (list, tuple)):
            if len(value) == 0:
                raise InputError(name, f"out[{key!r}]", f"expected {expected}, got an empty list")
            items, is_list = list(value), True
        else:
            raise InputError(name, f"out[{key!r}]", f"expected {expected}, got {type(value).__name__}")
        for i, t in enumerate(items):
            where = f"out[{key!r}][{i}]" if is_list else f"out[{key!r}]"
            if not isinstance(t, Tensor):
                raise InputError(name, where, f"expected a tensor ({expected}), got {type(t).__name__}")
            if not t.is_floating_point():
                raise InputError(name, where, f"expected a floating-point tensor, got {t.dtype}")
            if t.dim() != 3 or (width is not None and t.shape[2] != width):
                shape = "(B, HWA_l, " if is_list else "(B, A, "
                shape += f"{width})" if width is not None else "C)"
                raise InputError(name, where, f"expected shape {shape}, got {fmt_shape(t.shape)}")
        return items, is_list

    def _parse(self, out: Mapping[str, Any], target: Mapping[str, Any]) -> _Parsed:
        name = self.name
        cls_levels, cls_list = self._levels(
            out, "cls_logits", "(B, A, C) logits or a list of (B, HWA_l, C), one per level", None
        )
        reg_levels, reg_list = self._levels(
            out, "bbox_regression", "(B, A, 4) deltas or a list of (B, HWA_l, 4), one per level", 4
        )
        b, c = int(cls_levels[0].shape[0]), int(cls_levels[0].shape[2])
        ref = ("out['cls_logits'][0]" if cls_list else "out['cls_logits']", cls_levels[0])
        for key, levels, is_list in (
            ("cls_logits", cls_levels, cls_list),
            ("bbox_regression", reg_levels, reg_list),
        ):
            for i, t in enumerate(levels):
                where = f"out[{key!r}][{i}]" if is_list else f"out[{key!r}]"
                if t.shape[0] != b or (key == "cls_logits" and t.shape[2] != c):
                    want = f"(B={b}, HWA_l, C={c})" if key == "cls_logits" else f"(B={b}, HWA_l, 4)"
                    raise InputError(
                        name,
                        where,
                        f"expected {want} like out['cls_logits'][0], got {fmt_shape(t.shape)}",
                    )
        if c == 0:
            raise InputError(
                name,
                "out['cls_logits']",
                f"expected at least one class, got shape {fmt_shape(cls_levels[0].shape)}",
            )
        if cls_list and reg_list:
            if len(reg_levels) != len(cls_levels):
                raise InputError(
                    name,
                    "out['bbox_regression']",
                    f"expected {len(cls_levels)} levels like out['cls_logits'], got {len(reg_levels)}",
                )
            for i, (cl, rg) in enumerate(zip(cls_levels, reg_levels)):
                if rg.shape[1] != cl.shape[1]:
                    raise InputError(
                        name,
                        f"out['bbox_regression'][{i}]",
                        f"expected ({b}, {cl.shape[1]}, 4) to match out['cls_logits'][{i}] "
                        f"{fmt_shape(cl.shape)}, got {fmt_shape(rg.shape)}",
                    )
        num_anchors = sum(int(t.shape[1]) for t in cls_levels)
        num_reg = sum(int(t.shape[1]) for t in reg_levels)
        if num_reg != num_anchors:
            raise InputError(
                name,
                "out['bbox_regression']",
                f"expected {num_anchors} anchors in all like out['cls_logits'], got {num_reg}",
            )
        check_same_device(
            name,
            ref,
            *((f"out['cls_logits'][{i}]", t) for i, t in enumerate(cls_levels) if cls_list),
            *(
                (f"out['bbox_regression'][{i}]" if reg_list else "out['bbox_regression']", t)
                for i, t in enumerate(reg_levels)
            ),
        )
        anchors = self._anchors(out, b, num_anchors, ref)
        boxes, labels = self._gt(target, b, ref)
        check_values = value_checks_enabled(cls_levels[0])
        if check_values:
            self._check_gt_values(boxes, labels, c)
            self._check_anchor_values(anchors)
        return _Parsed(cls_levels, reg_levels, anchors, boxes, labels, check_values)

    def _anchors(self, out: Mapping[str, Any], b: int, num_anchors: int, ref: tuple[str, Tensor]) -> Tensor:
        name = self.name
        expected = f"(A, 4) xyxy anchors with A = {num_anchors} (the anchors of out['cls_logits']), or a list of B = {b} such tensors"
        if "anchors" not in out:
            raise missing_key_error(name, "out", "anchors", out, expected)
        value = out["anchors"]
        if isinstance(value, (list, tuple)):
            if len(value) != b:
                raise InputError(
                    name, "out['anchors']", f"expected a list of B = {b} tensors, got {len(value)}"
                )
            items = list(value)
            wheres = [f"out['anchors'][{i}]" for i in range(b)]
        elif isinstance(value, Tensor):
            items, wheres = [value], ["out['anchors']"]
        else:
            raise InputError(name, "out['anchors']", f"expected {expected}, got {type(value).__name__}")
        for t, where in zip(items, wheres):
            if not isinstance(t, Tensor):
                raise InputError(name, where, f"expected a tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise InputError(name, where, f"expected a floating-point tensor, got {t.dtype}")
            if t.dim() != 2 or t.shape[1] != 4 or t.shape[0] != num_anchors:
                raise InputError(
                    name,
                    where,
                    f"expected ({num_anchors}, 4) (A = the anchors of out['cls_logits']), got {fmt_shape(t.shape)}",
                )
            check_same_device(name, ref, (where, t))
        if isinstance(value, Tensor):
            return value
        if not items:  # B = 0
            return torch.zeros(0, num_anchors, 4, device=ref[1].device)
        if all(t is items[0] for t in items):
            return items[0]
        return torch.stack(items)

    def _gt(self, target: Any, b: int, ref: tuple[str, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        name = self.name
        all_boxes, all_labels = get_box_targets(target, criterion=name, batch=b, batch_of="out['cls_logits']")
        boxes, labels = [], []
        for i, (bx, lb) in enumerate(zip(all_boxes, all_labels)):
            where = f"target['gt'][{i}]"
            if not bx.is_floating_point():
                raise InputError(
                    name, f"{where}['boxes']", f"expected a floating-point tensor, got {bx.dtype}"
                )
            check_same_device(name, ref, (f"{where}['boxes']", bx), (f"{where}['labels']", lb))
            boxes.append(bx)
            labels.append(lb)
        return boxes, labels

    def _check_gt_values(self, boxes: list[Tensor], labels: list[Tensor], c: int) -> None:
        name = self.name
        for i, (bx, lb) in enumerate(zip(boxes, labels)):
            if lb.numel() == 0:
                continue
            bad = (lb < 0) | (lb >= c)
            if bool(bad.any()):
                raise InputError(
                    name,
                    f"target['gt'][{i}]['labels']",
                    f"labels must be in [0, {c}) (C = out['cls_logits'].shape[-1]), got {int(lb[bad][0])}",
                )
            if not bool(torch.isfinite(bx).all()):
                raise InputError(
                    name, f"target['gt'][{i}]['boxes']", "contains non-finite values (NaN or inf)"
                )
            degenerate = (bx[:, 2] <= bx[:, 0]) | (bx[:, 3] <= bx[:, 1])
            if bool(degenerate.any()):
                j = int(degenerate.nonzero()[0, 0])
                raise InputError(
                    name,
                    f"target['gt'][{i}]['boxes']",
                    f"box {j} = {[round(float(v), 4) for v in bx[j]]} has zero or negative width or height; "
                    "expected x1 < x2 and y1 < y2",
                )

    def _check_anchor_values(self, anchors: Tensor) -> None:
        if anchors.numel() == 0:
            return
        if not bool(torch.isfinite(anchors).all()):
            raise InputError(self.name, "out['anchors']", "contains non-finite values (NaN or inf)")
        if not bool(((anchors[..., 2] > anchors[..., 0]) & (anchors[..., 3] > anchors[..., 1])).all()):
            raise InputError(
                self.name,
                "out['anchors']",
                "has anchors of zero or negative width or height; expected x1 < x2 and y1 < y2",
            )

    def _check_finite(self, res: RetinaNetLossOutput, p: _Parsed) -> None:
        """Only when value checks run: name the input behind a non-finite term."""
        if bool(torch.isfinite(res.classification) & torch.isfinite(res.bbox_regression)):
            return
        named = [
            (f"out[{key!r}][{i}]" if len(levels) > 1 else f"out[{key!r}]", t)
            for key, levels in (("cls_logits", p.cls_levels), ("bbox_regression", p.reg_levels))
            for i, t in enumerate(levels)
        ]
        error = explain_non_finite(self.name, named)
        if error is not None:
            raise error
        key = "cls_logits" if not bool(torch.isfinite(res.classification)) else "bbox_regression"
        values = torch.cat(
            [t.detach().reshape(-1) for where, t in named if where.startswith(f"out[{key!r}]")]
        )
        span = f"from {float(values.min()):.3g} to {float(values.max()):.3g}" if values.numel() else "empty"
        raise InputError(
            self.name,
            f"out[{key!r}]",
            f"the loss overflowed to a non-finite value although every input is finite; its values range "
            f"{span}: magnitudes too large?",
        )


class _Parsed(NamedTuple):
    cls_levels: list[Tensor]
    reg_levels: list[Tensor]
    anchors: Tensor
    boxes: list[Tensor]
    labels: list[Tensor]
    check_values: bool


def _grid_anchors(
    image_size: int, *, strides: Sequence[int], sizes: Sequence[float], ratios: Sequence[float]
) -> Tensor:
    """``(A, 4)`` anchors level by level, location-major (row, column), then ratio, as torchvision orders them."""
    out = []
    for stride, size in zip(strides, sizes):
        r = torch.tensor(ratios)
        h = size * torch.sqrt(r)
        w = size / torch.sqrt(r)
        base = torch.stack([-w, -h, w, h], dim=1) / 2  # (R, 4)
        n = image_size // stride
        shifts = torch.arange(n, dtype=torch.float32) * stride
        sy, sx = torch.meshgrid(shifts, shifts, indexing="ij")
        shift = torch.stack([sx, sy, sx, sy], dim=-1).reshape(-1, 1, 4)
        out.append((shift + base[None]).reshape(-1, 4))
    return torch.cat(out)
