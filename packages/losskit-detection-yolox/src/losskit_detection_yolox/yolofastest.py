# SPDX-License-Identifier: Apache-2.0
"""The YOLO-Fastest loss: an anchor-based head (several sized anchors per cell) trained with YOLOX's
SimOTA assignment and its IoU, objectness and class terms.

It is the same batched SimOTA and the same terms as :mod:`losskit_detection_yolox.yolox`; only the
head layout and the box decode differ. Reference: NetsPresso Trainer 1.4.1,
``losses/detection/yolo.py`` (``YOLOFastestLoss``, a subclass of its YOLOX loss) and
``models/heads/detection/experimental/yolo_fastest_head.py``; the head is YOLO-Fastest-v2
(https://github.com/dog-qiuqiu/Yolo-FastestV2).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from losskit import Criterion, InputError, LossTerms, option
from losskit.checks import (
    fmt_shape,
    get_img_size,
    get_levels,
    missing_key_error,
)
from losskit.tensors import autocast_off, example_gt
from losskit_detection_yolox._assign import AnchorGrid, Assignment
from losskit_detection_yolox.yolox import (
    _assign,
    _Batch,
    _check_num_classes,
    _ground_truths,
    _terms,
    check_finite_levels,
)

__all__ = ["YOLOFastestLoss", "YOLOFastestLossConfig", "yolofastest_assign", "yolofastest_loss"]

NAME = "yolofastest_loss"
#: ``w = 4 sigmoid(tw - ln 3) anchor_w``: ``tw = 0`` decodes to the anchor's own size.
LOG3 = math.log(3.0)
#: NetsPresso Trainer's YOLO-Fastest-v2 anchors (pixels, strides 16 and 32), for examples and docs.
V2_ANCHORS = ((12.0, 18.0, 37.0, 49.0, 52.0, 132.0), (115.0, 73.0, 119.0, 199.0, 242.0, 238.0))
_TERMS = ("iou", "obj", "cls")
_DIAGNOSTICS = ("num_fg", "invalid_targets")


@dataclass(frozen=True)
class YOLOFastestLossConfig:
    """Fields of ``yolofastest_loss``; the defaults are NetsPresso Trainer's (those of its YOLOX loss)."""

    anchors: tuple[tuple[float, ...], ...] | None = option(
        None,
        gt=0.0,
        min_items=1,
        required=True,
        example=V2_ANCHORS,
        doc="Per level, the anchor sizes in pixels as a flat list [w0, h0, w1, h1, ...] "
        "(2 values per anchor of the level's cells).",
    )
    reg_weight: float = option(5.0, ge=0.0, doc="Weight of the IoU term.")
    center_radius: float = option(
        1.5, gt=0.0, doc="Centre-prior radius in strides: candidate cells lie within it of a box centre."
    )
    candidate_topk: int = option(10, ge=1, doc="Number of top IoUs summed for SimOTA's dynamic k.")
    iou_cost_weight: float = option(3.0, ge=0.0, doc="Weight of -log(IoU + 1e-8) in the assignment cost.")
    iou_loss: Literal["iou", "giou"] = option(
        "giou", doc="Box loss: 'giou' is 1 - GIoU (NetsPresso's), 'iou' is 1 - IoU^2."
    )
    l1_activate_epoch: int | None = option(
        None,
        ge=0,
        doc="No effect: accepted so that NetsPresso configs load unchanged (its YOLO-Fastest loss has "
        "no L1 term).",
    )
    num_classes: int | None = option(
        None, ge=1, doc="Number of classes C; null infers it from the channels (5 + C) of out['pred']."
    )
    normalize_across_ranks: bool = option(
        False, doc="Divide by the foreground count averaged over torch.distributed ranks (off in NetsPresso)."
    )
    candidate_slots: Literal["auto", "exact", "static"] = option(
        "auto",
        doc="Sizing of the candidate tensors: 'exact' reads the largest candidate count back "
        "(a device sync; least memory), 'static' uses a bound known on the host (no sync), "
        "'auto' is exact on CPU and static on accelerators and under torch.compile. The result is "
        "the same.",
    )

    def validate(self) -> list[tuple[str, str]]:
        if self.anchors is None:  # reported by the schema (a required field)
            return []
        return [
            ("anchors", f"level {i} has {len(level)} values; expected (w, h) pairs: an even count")
            for i, level in enumerate(self.anchors)
            if len(level) % 2
        ]


def _levels(out: Any, anchors: Sequence[Sequence[float]]) -> list[Tensor]:
    """The head outputs ``(B, nA_l, 5 + C, H_l, W_l)``, checked against each other and the anchors."""
    key = "out['pred']"
    expected = "a list over pyramid levels of (B, nA, 5 + C, H_l, W_l) raw head outputs"
    if not isinstance(out, Mapping):
        raise InputError(NAME, "out", f"expected a mapping with key 'pred', got {type(out).__name__}")
    if "pred" not in out:
        raise missing_key_error(NAME, "out", "pred", out, expected)
    pred = out["pred"]
    if isinstance(pred, Sequence) and not isinstance(pred, (str, bytes)) and len(pred) != len(anchors):
        raise InputError(
            NAME,
            key,
            f"got {len(pred)} levels but the config's anchors give {len(anchors)}; expected {expected}",
        )
    levels = get_levels(
        pred,
        key,
        criterion=NAME,
        shape="(B, nA, 5 + C, H, W)",
        ndim=5,
        channel_dim=2,
        channels="5 + C",
        rank_hint="; a (B, nA * (5 + C), H, W) output can be passed as p.view(B, nA, 5 + C, H, W)",
        each=lambda i, p: _check_anchors_and_channels(p, i, anchors[i]),
    )
    return levels


def _check_anchors_and_channels(p: Tensor, i: int, anchors: Sequence[float]) -> None:
    where = f"out['pred'][{i}]"
    n = len(anchors) // 2
    if p.shape[1] != n:
        raise InputError(
            NAME,
            where,
            f"has {p.shape[1]} anchors per cell (dim 1, shape {fmt_shape(p.shape)}) but the config's "
            f"anchors[{i}] lists {len(anchors)} values, {n} (w, h) pairs; it must hold 2 * nA values",
        )
    if p.shape[2] < 6:
        raise InputError(NAME, where, f"expected 5 + C channels with C >= 1, got shape {fmt_shape(p.shape)}")


def _prepare(out: Any, target: Any, *, anchors: Sequence[Sequence[float]], num_classes: int | None) -> _Batch:
    levels = _levels(out, anchors)
    if not isinstance(target, Mapping):
        raise InputError(
            NAME, "target", f"expected a mapping with keys 'gt', 'img_size', got {type(target).__name__}"
        )
    c = levels[0].shape[2] - 5
    _check_num_classes(target, c, num_classes, NAME)
    img_h, img_w = get_img_size(target, criterion=NAME)
    shapes = [(int(p.shape[3]), int(p.shape[4])) for p in levels]
    strides = [(img_h / h, img_w / w) for h, w in shapes]
    device = levels[0].device
    batch = int(levels[0].shape[0])
    check_finite_levels(levels, NAME)
    gts = _ground_truths(target, batch, c, device, NAME)
    sizes = [[(float(a[j]), float(a[j + 1])) for j in range(0, len(a), 2)] for a in anchors]
    grid = AnchorGrid.build(shapes, strides, device, anchor_sizes=sizes)
    # each level as (B, 5 + C, nA * H, W): anchors in (anchor, row, column) order, as the grid's
    stacked = tuple(
        p.transpose(1, 2).reshape(batch, c + 5, p.shape[1] * p.shape[3], p.shape[4]) for p in levels
    )
    return _Batch(stacked, grid, gts, c)


def _decode_anchors(reg: Tensor, grid: AnchorGrid, index: Tensor) -> Tensor:
    """Raw ``(B, 4, N)`` regression at anchors ``index`` ``(B, N)`` to ``(B, N, 4)`` boxes
    ``(cx, cy, w, h)`` in pixels: ``cx = (sigmoid(tx) + x) s``, ``w = 4 sigmoid(tw - ln 3) anchor_w``
    (the same as ``2 (tanh(tw / 2 - atanh(1/2)) + 1) anchor_w``; bounded, so nothing can overflow)."""
    if grid.sizes is None:  # not reachable through this module: its grids always carry anchor sizes
        raise ValueError("an anchor-based decode needs a grid with anchor sizes")
    dt = reg.dtype
    size = grid.sizes[index].to(dt)  # (B, N, 2)
    cx = (reg[:, 0].sigmoid() + grid.x[index].to(dt)) * grid.stride_x[index].to(dt)
    cy = (reg[:, 1].sigmoid() + grid.y[index].to(dt)) * grid.stride_y[index].to(dt)
    w = 4.0 * torch.sigmoid(reg[:, 2] - LOG3) * size[..., 0]
    h = 4.0 * torch.sigmoid(reg[:, 3] - LOG3) * size[..., 1]
    return torch.stack((cx, cy, w, h), dim=-1)


def _loss_of_batch(batch: _Batch, cfg: YOLOFastestLossConfig) -> LossTerms:
    with autocast_off(batch.levels[0].device):
        cand = _assign(
            batch,
            center_radius=cfg.center_radius,
            candidate_topk=cfg.candidate_topk,
            iou_cost_weight=cfg.iou_cost_weight,
            candidate_slots=cfg.candidate_slots,
            decode=_decode_anchors,
        )
        full = _terms(
            batch,
            cand,
            reg_weight=cfg.reg_weight,
            iou_loss=cfg.iou_loss,
            use_l1=False,
            candidate_topk=cfg.candidate_topk,
            normalize_across_ranks=cfg.normalize_across_ranks,
            decode=_decode_anchors,
        )
    return LossTerms({k: full[k] for k in _TERMS}, {k: full.diagnostics[k] for k in _DIAGNOSTICS})


@torch.no_grad()
def _assignment(batch: _Batch, cfg: YOLOFastestLossConfig) -> Assignment:
    with autocast_off(batch.levels[0].device):
        cand = _assign(
            batch,
            center_radius=cfg.center_radius,
            candidate_topk=cfg.candidate_topk,
            iou_cost_weight=cfg.iou_cost_weight,
            candidate_slots=cfg.candidate_slots,
            decode=_decode_anchors,
        )
    return cand.to_anchors(batch.grid.num_anchors)


def _config(**fields: Any) -> YOLOFastestLossConfig:
    return YOLOFastestLoss.make_config(**fields)


def yolofastest_assign(
    pred: Sequence[Tensor],
    gt: Sequence[Mapping[str, Tensor]],
    img_size: int | tuple[int, int],
    *,
    anchors: Sequence[Sequence[float]] | None = YOLOFastestLossConfig.anchors,
    num_classes: int | None = YOLOFastestLossConfig.num_classes,
    center_radius: float = YOLOFastestLossConfig.center_radius,
    candidate_topk: int = YOLOFastestLossConfig.candidate_topk,
    iou_cost_weight: float = YOLOFastestLossConfig.iou_cost_weight,
    candidate_slots: Literal["auto", "exact", "static"] = YOLOFastestLossConfig.candidate_slots,
) -> Assignment:
    """SimOTA assignment of the YOLO-Fastest loss; see :func:`yolofastest_loss` for the arguments.

    Returns:
        :class:`Assignment` over ``A = sum_l nA_l H_l W_l`` anchors ordered level, anchor, row, column.
    """
    cfg = _config(
        anchors=anchors,
        num_classes=num_classes,
        center_radius=center_radius,
        candidate_topk=candidate_topk,
        iou_cost_weight=iou_cost_weight,
        candidate_slots=candidate_slots,
    )
    batch = _prepare(
        {"pred": pred}, {"gt": gt, "img_size": img_size}, anchors=_anchors_of(cfg), num_classes=num_classes
    )
    return _assignment(batch, cfg)


def _anchors_of(cfg: YOLOFastestLossConfig) -> tuple[tuple[float, ...], ...]:
    """The anchors of a validated config (never None: validation requires them)."""
    if cfg.anchors is None:  # excluded by validation (a required field)
        raise ValueError("anchors are required")
    return cfg.anchors


def yolofastest_loss(
    pred: Sequence[Tensor],
    gt: Sequence[Mapping[str, Tensor]],
    img_size: int | tuple[int, int],
    *,
    anchors: Sequence[Sequence[float]] | None = YOLOFastestLossConfig.anchors,
    num_classes: int | None = YOLOFastestLossConfig.num_classes,
    reg_weight: float = YOLOFastestLossConfig.reg_weight,
    center_radius: float = YOLOFastestLossConfig.center_radius,
    candidate_topk: int = YOLOFastestLossConfig.candidate_topk,
    iou_cost_weight: float = YOLOFastestLossConfig.iou_cost_weight,
    iou_loss: Literal["iou", "giou"] = YOLOFastestLossConfig.iou_loss,
    normalize_across_ranks: bool = YOLOFastestLossConfig.normalize_across_ranks,
    candidate_slots: Literal["auto", "exact", "static"] = YOLOFastestLossConfig.candidate_slots,
) -> LossTerms:
    """The YOLO-Fastest loss of a batch: SimOTA on the decoded anchor boxes, then IoU, objectness
    and class terms.

    Args:
        pred: per pyramid level, raw head outputs ``(B, nA, 5 + C, H_l, W_l)`` with channels
            ``[tx, ty, tw, th, obj, cls_0 .. cls_{C-1}]`` per anchor. Anchors are ordered level, anchor,
            row, column; anchor ``a`` of cell ``(x, y)`` decodes to ``cx = (sigmoid(tx) + x) s``,
            ``cy = (sigmoid(ty) + y) s``, ``w = 4 sigmoid(tw - ln 3) anchor_w``,
            ``h = 4 sigmoid(th - ln 3) anchor_h``.
        gt: B dicts ``{"boxes": (n_i, 4) xyxy in input pixels, "labels": (n_i,) int in [0, C)}``.
        img_size: ``H = W`` or ``(H, W)`` of the network input; the stride of level ``l`` is
            ``W / W_l`` along x and ``H / H_l`` along y.
        anchors: per level, ``[w0, h0, w1, h1, ...]`` in pixels (``2 nA`` values); required (the
            ``None`` default raises :class:`losskit.ConfigError`).
        num_classes: C, checked against the channels when given.
        reg_weight: weight of the IoU term.
        center_radius: centre-prior radius in strides (the prior is the cell's, for all its anchors).
        candidate_topk: IoUs summed for SimOTA's dynamic k.
        iou_cost_weight: weight of ``-log(IoU + 1e-8)`` in the assignment cost.
        iou_loss: ``"giou"`` (``1 - GIoU``) or ``"iou"`` (``1 - IoU^2``).
        normalize_across_ranks: divide by the foreground count averaged over data-parallel ranks.
        candidate_slots: sizing of the candidate tensors (see :func:`losskit_detection_yolox.yolox_loss`).

    Returns:
        :class:`losskit.LossTerms` with the float32 terms ``iou = reg_weight sum_fg loss_iou``,
        ``obj = sum over all anchors of BCE(obj, fg)``, ``cls = sum_fg sum_c BCE(cls_c, onehot_c IoU)``,
        each divided by ``num_fg = max(foreground anchors of the batch, 1)``, and the diagnostics
        ``num_fg`` (before the clamp) and ``invalid_targets`` (ground truths left out of matching:
        labels outside ``[0, C)``, inverted or non-finite boxes, when value checks are off).
    """
    cfg = _config(
        anchors=anchors,
        num_classes=num_classes,
        reg_weight=reg_weight,
        center_radius=center_radius,
        candidate_topk=candidate_topk,
        iou_cost_weight=iou_cost_weight,
        iou_loss=iou_loss,
        normalize_across_ranks=normalize_across_ranks,
        candidate_slots=candidate_slots,
    )
    batch = _prepare(
        {"pred": pred}, {"gt": gt, "img_size": img_size}, anchors=_anchors_of(cfg), num_classes=num_classes
    )
    return _loss_of_batch(batch, cfg)


class YOLOFastestLoss(Criterion[YOLOFastestLossConfig]):
    """YOLO-Fastest loss: SimOTA on the decoded anchor boxes, then IoU, objectness and class terms.

    NetsPresso Trainer's ``yolofastest_loss``. The assignment and the terms are YOLOX's (:class:`~losskit_detection_yolox.YOLOXLoss`, batched,
    shared code), on an anchor-based head: ``nA`` anchors per cell, each decoding to
    ``cx = (sigmoid(tx) + x) s``, ``cy = (sigmoid(ty) + y) s``, ``w = 4 sigmoid(tw - ln 3) anchor_w``,
    ``h = 4 sigmoid(th - ln 3) anchor_h``. Terms, each divided by ``num_fg = max(foreground anchors, 1)``:
    ``iou = reg_weight * sum_fg (1 - GIoU)`` (or ``1 - IoU^2``), ``obj = sum over all anchors of
    BCE(obj, fg)``, ``cls = sum_fg sum_c BCE(cls_c, onehot_c * IoU)``. No L1 term.

    Inputs:
        out["pred"]: list over levels of raw head outputs ``(B, nA, 5 + C, H_l, W_l)``.
        target["gt"]: B dicts ``{"boxes": (n_i, 4) xyxy pixels, "labels": (n_i,) int64}``.
        target["img_size"]: ``H = W`` or ``(H, W)`` of the network input.

    Reference: NetsPresso Trainer 1.4.1 (https://github.com/Nota-NetsPresso/netspresso-trainer,
    ``losses/detection/yolo.py``); Ge et al., "YOLOX: Exceeding YOLO Series in 2021", arXiv:2107.08430.
    """

    name: ClassVar[str] = NAME
    Config = YOLOFastestLossConfig
    terms: ClassVar[tuple[str, ...]] = _TERMS
    diagnostics: ClassVar[tuple[str, ...]] = _DIAGNOSTICS
    inputs: ClassVar[Mapping[str, str]] = {
        "pred": "list over pyramid levels of (B, nA, 5 + C, H_l, W_l) raw head outputs "
        "[tx, ty, tw, th, obj, cls_0..cls_{C-1}] per anchor",
    }
    targets: ClassVar[Mapping[str, str]] = {
        "gt": "list of B dicts {'boxes': (n_i, 4) float xyxy in input pixels, 'labels': (n_i,) int64 in [0, C)}",
        "img_size": "int or (H, W) of the network input; level stride = img_size / W_l",
        "num_classes": "optional int C, checked against the channels of out['pred']",
    }

    @property
    def anchors(self) -> tuple[tuple[float, ...], ...]:
        """The configured anchors, per level ``[w0, h0, w1, h1, ...]`` in pixels."""
        return _anchors_of(self.config)

    def _batch(self, out: Any, target: Any) -> _Batch:
        return _prepare(out, target, anchors=self.anchors, num_classes=self.config.num_classes)

    def forward(self, out: Mapping[str, Any], target: Mapping[str, Any]) -> LossTerms:
        return _loss_of_batch(self._batch(out, target), self.config)

    @torch.no_grad()
    def assign(self, out: Mapping[str, Any], target: Mapping[str, Any]) -> Assignment:
        """The SimOTA assignment the loss would use, per image and anchor.

        Returns:
            :class:`Assignment`: ``fg_mask (B, A)`` bool, ``matched_gt (B, A)`` int64 index into the
            image's ``gt`` (``-1`` for background), ``matched_iou (B, A)`` float32, ``dynamic_k (B, G)``;
            anchors ordered level, anchor, row, column.
        """
        return _assignment(self._batch(out, target), self.config)

    def example(
        self,
        batch_size: int = 2,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """A 128x128 input with one level per configured anchor list (8x8, 4x4, ...), C = 3 (or
        ``num_classes``), 0-4 boxes per image."""
        c = self.config.num_classes or 3
        img = 128
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        pred = []
        for i, level in enumerate(self.anchors):
            side = max(8 >> i, 1)
            p = torch.randn(batch_size, len(level) // 2, 5 + c, side, side, generator=gen) * 0.5
            pred.append(p.to(device).requires_grad_(True))
        gt = example_gt(
            batch_size, img, c, generator=gen, device=device, margin=32.0, min_size=8.0, spread=80.0
        )
        return {"pred": pred}, {"gt": gt, "img_size": img}
