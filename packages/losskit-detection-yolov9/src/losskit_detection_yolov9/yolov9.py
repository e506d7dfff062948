# SPDX-License-Identifier: Apache-2.0
"""The YOLOv9 loss of NetsPresso Trainer / MultimediaTechLab YOLO: task-aligned top-k assignment, a
BCE class term, a CIoU box term and the distribution focal loss (DFL), batched.

Reference: Wang et al., "YOLOv9: Learning What You Want to Learn Using Programmable Gradient
Information", arXiv:2402.13616; https://github.com/MultimediaTechLab/YOLO
(``yolo/tools/loss_functions.py`` and ``yolo/utils/bounding_box_utils.py`` at 5c767f2, the port in
NetsPresso Trainer 1.4.1 ``losses/detection/yolov9.py``; the revised matcher of PR #125).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torch.compiler import is_compiling

from losskit import ConfigError, Criterion, InputError, LossTerms, option
from losskit.checks import get_box_targets, get_img_size, get_levels, value_checks_enabled
from losskit.dist import global_mean, is_distributed
from losskit.tensors import autocast_off, example_gt, graph_zero
from losskit_detection_yolov9._assign import (
    REACH_MARGIN,
    AnchorGrid,
    Assigner,
    Assignment,
    GroundTruths,
    Match,
    decode_distances,
    match,
)
from losskit_ops import yolo_box_iou

__all__ = ["YOLOv9Loss", "YOLOv9LossConfig", "softplus_sum", "yolov9_assign", "yolov9_loss"]

NAME = "yolov9_loss"
_ASSIGNERS = ("netspresso", "upstream")


@dataclass(frozen=True)
class YOLOv9LossConfig:
    """Fields of ``yolov9_loss``; the defaults are NetsPresso Trainer's constants."""

    reg_max: int = option(16, ge=2, doc="R, the DFL bins per box side; out['pred'] has 4 R + C channels.")
    topk: int = option(10, ge=1, doc="Anchors kept per ground truth by the matcher (largest scores).")
    iou_factor: float = option(6.0, ge=0.0, doc="Exponent of the CIoU in the matching score.")
    cls_factor: float = option(0.5, ge=0.0, doc="Exponent of the class probability in the matching score.")
    cls_weight: float = option(0.5, ge=0.0, doc="Weight of the BCE class term.")
    dfl_weight: float = option(1.5, ge=0.0, doc="Weight of the distribution focal loss term.")
    iou_weight: float = option(7.5, ge=0.0, doc="Weight of the CIoU box term.")
    assigner: Literal["netspresso", "upstream"] = option(
        "netspresso",
        doc="'netspresso': the matcher of NetsPresso Trainer (YOLO at 5c767f2); 'upstream': YOLO's revised "
        "matcher (PR #125: reach test, top-k on in-box anchors, one anchor at least, duplicates among keepers).",
    )
    aux_weight: float = option(
        0.0,
        ge=0.0,
        doc="Weight of the same loss on out['pred']['aux_outputs'] (own assignment), reported as aux_*; "
        "0 ignores the aux branch as NetsPresso does (YOLO's dual loss uses 0.25).",
    )
    cls_norm_min: float = option(
        1.0, gt=0.0, doc="Lower clamp of the normaliser (the sum of the soft class targets of the batch)."
    )
    num_classes: int | None = option(
        None, ge=1, doc="Number of classes C; null infers it from the channels (4 R + C) of out['pred']."
    )
    normalize_across_ranks: bool = option(
        False, doc="Divide by the soft-target sum averaged over torch.distributed ranks (off in NetsPresso)."
    )
    l1_activate_epoch: int | None = option(
        None, ge=0, doc="Accepted so that NetsPresso's YOLOv9 configs load unchanged; it has no effect."
    )


@dataclass(frozen=True)
class _Batch:
    """Validated inputs of one branch: levels, anchors and ground truths."""

    levels: tuple[Tensor, ...]  # (B, 4 R + C, H_l, W_l), the caller's tensors
    grid: AnchorGrid
    gts: GroundTruths
    num_classes: int


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _level_list(pred: Any, key: str, channels: int | None) -> list[Tensor]:
    levels = get_levels(pred, key, criterion=NAME, shape="(B, 4 R + C, H, W)")
    if channels is not None and levels[0].shape[1] != channels:
        raise InputError(
            NAME, f"{key}[0]", f"expected {channels} channels like the main outputs, got {levels[0].shape[1]}"
        )
    return levels


def _branches(out: Any, aux: bool) -> tuple[list[Tensor], list[Tensor] | None]:
    """The main levels and, when ``aux``, the aux levels of ``out['pred']`` (a list or NetsPresso's mapping)."""
    if not isinstance(out, Mapping):
        raise InputError(NAME, "out", f"expected a mapping with key 'pred', got {type(out).__name__}")
    if "pred" not in out:
        keys = ", ".join(repr(k) for k in out) or "none"
        raise InputError(NAME, "out['pred']", f"missing; out has keys {keys}; expected: a list of levels")
    pred = out["pred"]
    if not isinstance(pred, Mapping):
        main = _level_list(pred, "out['pred']", None)
        if aux:
            raise InputError(
                NAME,
                "out['pred']['aux_outputs']",
                "missing: aux_weight > 0 needs out['pred'] = {'outputs': [...], 'aux_outputs': [...]}",
            )
        return main, None
    for name in ("outputs", *(("aux_outputs",) if aux else ())):
        if name not in pred:
            keys = ", ".join(repr(k) for k in pred) or "none"
            raise InputError(NAME, f"out['pred'][{name!r}]", f"missing; out['pred'] has keys {keys}")
    main = _level_list(pred["outputs"], "out['pred']['outputs']", None)
    if not aux:
        return main, None
    aux_levels = _level_list(pred["aux_outputs"], "out['pred']['aux_outputs']", int(main[0].shape[1]))
    key = "out['pred']['aux_outputs']"
    if [p.shape[2:] for p in aux_levels] != [p.shape[2:] for p in main] or aux_levels[0].shape[0] != main[
        0
    ].shape[0]:
        raise InputError(
            NAME, key, "expected the same batch size and grids as out['pred']['outputs'] (one anchor set)"
        )
    if aux_levels[0].device != main[0].device:
        raise InputError(NAME, key, f"on {aux_levels[0].device}, the outputs on {main[0].device}")
    return main, aux_levels


def _num_classes(
    levels: list[Tensor], target: Mapping[str, Any], reg_max: int, num_classes: int | None
) -> int:
    ch = int(levels[0].shape[1])
    c = ch - 4 * reg_max
    if num_classes is not None and ch != 4 * reg_max + num_classes:
        raise InputError(
            NAME,
            "out['pred'][0]",
            f"expected 4 reg_max + num_classes = {4 * reg_max + num_classes} channels, got {ch}",
        )
    if c < 1:
        raise InputError(
            NAME,
            "out['pred'][0]",
            f"got {ch} channels; expected 4 reg_max + C = {4 * reg_max} + C with C >= 1",
        )
    given = target.get("num_classes")
    if given is not None and (not _is_int(given) or given != c):
        raise InputError(
            NAME,
            "target['num_classes']",
            f"{given!r} does not match the {ch} channels of out['pred'] (4 reg_max + C with C = {c})",
        )
    return c


def _ground_truths(target: Any, batch: int, num_classes: int, device: torch.device) -> GroundTruths:
    all_boxes, all_labels = get_box_targets(target, criterion=NAME, batch=batch, batch_of="out['pred']")
    boxes_list, labels_list, image, local = [], [], [], []
    for i, (boxes, labels) in enumerate(zip(all_boxes, all_labels)):
        where = f"target['gt'][{i}]"
        if boxes.device != device or labels.device != device:
            raise InputError(
                NAME, where, f"boxes/labels on {boxes.device}/{labels.device}, out['pred'] on {device}"
            )
        if value_checks_enabled(labels) and labels.numel():
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= num_classes:
                bad = lo if lo < 0 else hi
                raise InputError(
                    NAME,
                    f"{where}['labels']",
                    f"class {bad} is out of range; expected values in [0, {num_classes})",
                )
        if value_checks_enabled(boxes) and boxes.numel():
            if not bool(torch.isfinite(boxes).all()):
                raise InputError(NAME, f"{where}['boxes']", "contains non-finite values (nan or inf)")
            if bool(((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any()):
                raise InputError(NAME, f"{where}['boxes']", "expected x2 >= x1 and y2 >= y1 (xyxy boxes)")
        n = int(boxes.shape[0])
        boxes_list.append(boxes.to(torch.float32))
        labels_list.append(labels.to(torch.int64))
        image.append(torch.full((n,), i, dtype=torch.int64, device=device))
        local.append(torch.arange(n, device=device))
    boxes = torch.cat([torch.zeros(0, 4, device=device), *boxes_list])
    labels = torch.cat([torch.zeros(0, dtype=torch.int64, device=device), *labels_list])
    valid = (
        torch.isfinite(boxes).all(1)
        & (boxes[:, 2] >= boxes[:, 0])
        & (boxes[:, 3] >= boxes[:, 1])
        & (labels >= 0)
        & (labels < num_classes)
    )
    return GroundTruths(
        torch.where(valid[:, None], boxes, 0.0),
        labels.clamp(0, num_classes - 1),
        torch.cat([torch.zeros(0, dtype=torch.int64, device=device), *image]),
        torch.cat([torch.zeros(0, dtype=torch.int64, device=device), *local]),
        valid,
        tuple(int(b.shape[0]) for b in boxes_list),
    )


def _check_finite(levels: Sequence[Tensor], key: str) -> None:
    if value_checks_enabled(levels[0]):
        for i, p in enumerate(levels):
            # the sum is non-finite when any value is (or, rarely, on overflow: then look closer)
            if not bool(torch.isfinite(p.detach().sum())) and not bool(torch.isfinite(p).all()):
                raise InputError(NAME, f"{key}[{i}]", "contains non-finite values (nan or inf)")


def _prepare(
    out: Any, target: Any, *, reg_max: int, num_classes: int | None, aux: bool
) -> tuple[_Batch, _Batch | None]:
    main, aux_levels = _branches(out, aux)
    if not isinstance(target, Mapping):
        raise InputError(
            NAME, "target", f"expected a mapping with keys 'gt', 'img_size', got {type(target).__name__}"
        )
    c = _num_classes(main, target, reg_max, num_classes)
    img_w = int(get_img_size(target, criterion=NAME, integral=True)[1])
    shapes = [(int(p.shape[2]), int(p.shape[3])) for p in main]
    strides = []
    for i, (_, w) in enumerate(shapes):
        if img_w // w < 1:
            raise InputError(
                NAME,
                f"out['pred'][{i}]",
                f"grid width {w} exceeds the input width {img_w} (stride = W // W_l)",
            )
        strides.append(img_w // w)  # NetsPresso: the stride of a level is img_size[-1] // W_l
    device = main[0].device
    _check_finite(main, "out['pred']")
    if aux_levels is not None:
        _check_finite(aux_levels, "out['pred']['aux_outputs']")
    gts = _ground_truths(target, int(main[0].shape[0]), c, device)
    grid = AnchorGrid.build(shapes, strides, device)
    first = _Batch(tuple(main), grid, gts, c)
    return first, (_Batch(tuple(aux_levels), grid, gts, c) if aux_levels is not None else None)


#: Factors ``sigmoid(|x|)`` (each in [1/2, 1)) multiplied before one ``log`` in :func:`softplus_sum`.
_LOG_BLOCK = 64


#: Elements per chunk of :func:`softplus_sum` (fewer, larger chunks measured faster than cache-sized ones).
_CHUNK = 1 << 20


def _softplus_sum_block(x: Tensor) -> Tensor:
    factors = x.abs().reshape(-1)
    positive_part = (x.sum() + factors.sum()) / 2  # sum max(x, 0), without another buffer
    factors.sigmoid_()
    n = factors.numel() // _LOG_BLOCK * _LOG_BLOCK
    blocks = factors[:n].view(_LOG_BLOCK, -1)
    rows = _LOG_BLOCK
    while rows > 1:  # halve the rows: contiguous products, each row a product of more factors
        rows //= 2
        blocks[:rows].mul_(blocks[rows : 2 * rows])
    return positive_part - blocks[0].log().sum() - factors[n:].log().sum()


def softplus_sum(x: Tensor) -> Tensor:
    """``sum softplus(x)`` of a ``(B, C, N)`` tensor without gradient, one ``log`` per 64 elements.

    ``softplus(x) = max(x, 0) - log(sigmoid(|x|))`` and the factors ``sigmoid(|x|)`` lie in
    ``[1/2, 1)``, so a product of 64 of them is at least ``2^-64``: the sum of logs is the log of
    block products. On CPU ``log`` and ``exp`` cost several times ``sigmoid`` and products; this is
    several times faster than ``F.softplus(x).sum()`` and as accurate (the rounding of the products
    is about ``1e-6`` per block and averages out). The products are taken between halves of a
    chunk's buffer (contiguous), so element ``i`` of a block is ``blocks[i, j]`` for some column
    ``j``. Channels are taken in chunks of about ``2^20`` elements (4 MB in float32), which bounds
    the temporaries.
    """
    per = max(1, _CHUNK // max(1, x.shape[0] * x.shape[2]))
    total = x.new_zeros(())
    for start in range(0, x.shape[1], per):
        total = total + _softplus_sum_block(x[:, start : start + per])
    return total


class _Head(torch.autograd.Function):
    """Reads what the loss needs straight from the levels: ``sum softplus(class logits)`` over every
    anchor and class, the DFL logits ``(B, 4 R, F)`` and the logit of class ``labels`` ``(B, F)`` at
    the anchors ``index`` ``(B, F)``.

    ``sum_c BCE(x_c, t_c) = sum_c softplus(x_c) - x_y t`` for a target ``t`` at one class ``y``, so the
    class term needs no ``(B, A, C)`` target. Backward writes each level's gradient into one buffer of
    the level's shape: ``sigmoid(x)`` in the class channels, then the picked gradients added.
    """

    @staticmethod
    def forward(
        ctx: Any, index: Tensor, labels: Tensor, split: int, dtype: torch.dtype, *levels: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        b, f = index.shape
        reg = torch.zeros(b, split, f, dtype=dtype, device=index.device)
        label_logit = torch.zeros(b, f, dtype=dtype, device=index.device)
        total = torch.zeros((), dtype=dtype, device=index.device)
        start = 0
        for p in levels:
            flat = p.flatten(2)
            size = flat.shape[2]
            total = total + softplus_sum(flat[:, split:].to(dtype))
            local = index - start
            inside = (local >= 0) & (local < size)
            at = local.clamp(0, size - 1)
            got = flat[:, :split].gather(2, at[:, None, :].expand(b, split, f)).to(dtype)
            reg = torch.where(inside[:, None, :], got, reg)
            ch = flat.shape[1]
            logit = flat.reshape(b, ch * size).gather(1, (split + labels) * size + at).to(dtype)
            label_logit = torch.where(inside, logit, label_logit)
            start += size
        ctx.save_for_backward(index, labels, *levels)
        ctx.split = split
        ctx.dtype = dtype
        return total, reg, label_logit

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: Any, g_total: Tensor | None, g_reg: Tensor | None, g_label: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        index, labels, *levels = ctx.saved_tensors
        b, f = index.shape
        split = ctx.split
        grads: list[Tensor | None] = [None, None, None, None]
        start = 0
        for i, p in enumerate(levels):
            flat = p.flatten(2)
            ch, size = flat.shape[1], flat.shape[2]
            if not ctx.needs_input_grad[4 + i]:
                grads.append(None)
                start += size
                continue
            grad = torch.empty(b, ch, size, dtype=ctx.dtype, device=index.device)
            grad[:, :split] = 0.0
            if g_total is not None:
                if is_compiling():  # dynamo takes no strided out=
                    grad[:, split:].copy_(flat[:, split:]).sigmoid_().mul_(g_total)
                else:
                    torch.sigmoid(flat[:, split:], out=grad[:, split:]).mul_(g_total)
            else:
                grad[:, split:] = 0.0
            local = index - start
            inside = (local >= 0) & (local < size)
            at = local.clamp(0, size - 1)
            if g_reg is not None and f:
                src = torch.where(inside[:, None, :], g_reg, 0.0).to(ctx.dtype)
                grad.scatter_add_(2, at[:, None, :].expand(b, split, f), src)
            if g_label is not None and f:
                where = (split + labels) * size + at
                src = torch.where(inside, g_label, 0.0).to(ctx.dtype)
                grad.view(b, ch * size).scatter_add_(1, where, src)
            grads.append(grad.view(p.shape).to(p.dtype))
            start += size
        return tuple(grads)


@dataclass(frozen=True)
class _Weights:
    reg_max: int
    topk: int
    iou_factor: float
    cls_factor: float
    cls_weight: float
    dfl_weight: float
    iou_weight: float
    assigner: Assigner
    cls_norm_min: float
    normalize_across_ranks: bool


def _match(batch: _Batch, w: _Weights) -> Match:
    return match(
        batch.levels,
        batch.grid,
        batch.gts,
        reg_max=w.reg_max,
        topk=w.topk,
        iou_factor=w.iou_factor,
        cls_factor=w.cls_factor,
        assigner=w.assigner,
    )


def _normaliser(total: Tensor, w: _Weights) -> Tensor:
    """``max(total, cls_norm_min)``; across ranks ``max(mean total, cls_norm_min / world)``, so that the
    DDP-averaged gradient is the whole batch's divided by ``max(global total, cls_norm_min)``."""
    if w.normalize_across_ranks and is_distributed():
        return global_mean(total, enabled=True, min=None).clamp(min=w.cls_norm_min / dist.get_world_size())
    return total.detach().clamp(min=w.cls_norm_min)


def _dfl(logp: Tensor, target: Tensor) -> Tensor:
    """DFL ``(B, F)``: mean over the 4 sides of the cross-entropy against the two bins around the
    target distance ``(B, 4, F)``, weighted linearly; ``logp`` is ``(B, 4, R, F)``."""
    left = target.floor()
    right = left + 1
    lp_left = logp.gather(2, left.long()[:, :, None]).squeeze(2)
    lp_right = logp.gather(2, right.long()[:, :, None]).squeeze(2)
    return -(lp_left * (right - target) + lp_right * (target - left)).mean(1)


def _branch_terms(batch: _Batch, w: _Weights) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """``({cls, iou, dfl}, num_fg, cls_norm)`` of one branch, the terms weighted."""
    levels, grid, gts = batch.levels, batch.grid, batch.gts
    dtype = torch.float64 if levels[0].dtype == torch.float64 else torch.float32
    r = w.reg_max
    found = _match(batch, w)
    fg = found.fg
    b, a = fg.shape
    num_fg = fg.sum().to(torch.float32)
    cls_norm = _normaliser(found.scores.sum(), w)
    # foreground anchors are at most topk per ground truth: compact them into F slots (stable order)
    f = min(a, w.topk * gts.max_count)
    slots = torch.sort(fg.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :f]
    row = found.owner.gather(1, slots).clamp(min=0)
    label = gts.labels[row] if f else torch.zeros_like(slots)
    softplus_sum, reg, x_label = _Head.apply(slots, label, 4 * r, dtype, *levels)
    norm = cls_norm.to(dtype)
    if f == 0:  # no ground truth in the batch: the class term alone, graph intact
        zero = graph_zero(reg, softplus_sum)
        return {"cls": w.cls_weight * (softplus_sum / norm), "iou": zero, "dfl": zero}, num_fg, cls_norm
    fg_slot = fg.gather(1, slots)
    t = found.scores.gather(1, slots).to(dtype)  # 0 on background slots
    cls = w.cls_weight * ((softplus_sum - (x_label * t).sum()) / norm)

    logits = reg.reshape(b, 4, r, f)
    s = grid.stride[slots].to(dtype)
    ax, ay = grid.x[slots].to(dtype), grid.y[slots].to(dtype)
    d = decode_distances(logits, r) * s[:, None]
    pred = torch.stack((ax - d[:, 0], ay - d[:, 1], ax + d[:, 2], ay + d[:, 3]), -1) / s[..., None]
    gt = gts.boxes[row].to(dtype) / s[..., None]  # (B, F, 4) in strides
    ciou = yolo_box_iou(pred, gt)
    iou = w.iou_weight * (torch.where(fg_slot, (1.0 - ciou) * t, 0.0).sum() / norm)

    ax_s, ay_s = ax / s, ay / s
    target = torch.stack((ax_s - gt[..., 0], ay_s - gt[..., 1], gt[..., 2] - ax_s, gt[..., 3] - ay_s), 1)
    dfl_each = _dfl(logits.log_softmax(2), target.clamp(0, r - REACH_MARGIN))
    dfl = w.dfl_weight * (torch.where(fg_slot, dfl_each * t, 0.0).sum() / norm)
    return {"cls": cls, "iou": iou, "dfl": dfl}, num_fg, cls_norm


def _loss(main: _Batch, aux: _Batch | None, w: _Weights, aux_weight: float) -> LossTerms:
    with autocast_off(main.levels[0].device):
        terms, num_fg, cls_norm = _branch_terms(main, w)
        invalid = (~main.gts.valid).sum().to(torch.float32)
        diagnostics = {
            "num_fg": num_fg,
            "cls_norm": cls_norm.detach().to(torch.float32),
            "invalid_targets": invalid,
        }
        if aux is not None:
            aux_terms, _, _ = _branch_terms(aux, w)
            terms.update({f"aux_{k}": aux_weight * v for k, v in aux_terms.items()})
    return LossTerms(terms, diagnostics)


def _check_assigner(assigner: str) -> None:
    if assigner not in _ASSIGNERS:
        raise ConfigError(f"{NAME}.assigner: got {assigner!r}; allowed: {', '.join(map(repr, _ASSIGNERS))}")


def yolov9_loss(
    pred: Sequence[Tensor] | Mapping[str, Sequence[Tensor]],
    gt: Sequence[Mapping[str, Tensor]],
    img_size: int | tuple[int, int],
    *,
    num_classes: int | None = YOLOv9LossConfig.num_classes,
    reg_max: int = YOLOv9LossConfig.reg_max,
    topk: int = YOLOv9LossConfig.topk,
    iou_factor: float = YOLOv9LossConfig.iou_factor,
    cls_factor: float = YOLOv9LossConfig.cls_factor,
    cls_weight: float = YOLOv9LossConfig.cls_weight,
    dfl_weight: float = YOLOv9LossConfig.dfl_weight,
    iou_weight: float = YOLOv9LossConfig.iou_weight,
    assigner: Assigner = YOLOv9LossConfig.assigner,
    aux_weight: float = YOLOv9LossConfig.aux_weight,
    cls_norm_min: float = YOLOv9LossConfig.cls_norm_min,
    normalize_across_ranks: bool = YOLOv9LossConfig.normalize_across_ranks,
) -> LossTerms:
    """The YOLOv9 loss of a batch: assignment, then the class, CIoU and DFL terms.

    Args:
        pred: per pyramid level, raw head outputs ``(B, 4 R + C, H_l, W_l)``: channels ``[0, 4R)`` are
            DFL logits, side-major (``(B, 4, R, H, W)`` for the sides l, t, r, b), then C class logits.
            Or NetsPresso's mapping ``{"outputs": [...], "aux_outputs": [...]}``. Anchors are the
            grid cells, level by level, row-major, centred at ``(x s + s // 2, y s + s // 2)`` with
            ``s = W // W_l``; a cell's box is ``[cx - l s, cy - t s, cx + r s, cy + b s]`` with
            ``l = sum_r r softmax_r`` (likewise t, r, b).
        gt: B dicts ``{"boxes": (n_i, 4) xyxy in input pixels, "labels": (n_i,) int in [0, C)}``.
        img_size: ``H = W`` or ``(H, W)`` ints of the network input.
        num_classes: C, checked against the channels when given.
        reg_max, topk, iou_factor, cls_factor, cls_weight, dfl_weight, iou_weight, assigner,
            aux_weight, cls_norm_min, normalize_across_ranks: see :class:`YOLOv9LossConfig`.

    Returns:
        :class:`losskit.LossTerms` of weighted scalar terms, each divided by ``cls_norm = max(sum of
        the soft class targets, cls_norm_min)``: ``cls = cls_weight sum_{B A C} BCE``, ``iou =
        iou_weight sum_fg (1 - CIoU) w_a``, ``dfl = dfl_weight sum_fg w_a DFL`` (``w_a`` the anchor's
        soft target), plus ``aux_cls, aux_iou, aux_dfl`` (times ``aux_weight``) when it is > 0;
        diagnostics ``num_fg``, ``cls_norm``, ``invalid_targets``.
    """
    _check_assigner(assigner)
    w = _Weights(
        reg_max,
        topk,
        iou_factor,
        cls_factor,
        cls_weight,
        dfl_weight,
        iou_weight,
        assigner,
        cls_norm_min,
        normalize_across_ranks,
    )
    main, aux = _prepare(
        {"pred": pred},
        {"gt": gt, "img_size": img_size},
        reg_max=reg_max,
        num_classes=num_classes,
        aux=aux_weight > 0,
    )
    return _loss(main, aux, w, aux_weight)


def yolov9_assign(
    pred: Sequence[Tensor] | Mapping[str, Sequence[Tensor]],
    gt: Sequence[Mapping[str, Tensor]],
    img_size: int | tuple[int, int],
    *,
    num_classes: int | None = YOLOv9LossConfig.num_classes,
    reg_max: int = YOLOv9LossConfig.reg_max,
    topk: int = YOLOv9LossConfig.topk,
    iou_factor: float = YOLOv9LossConfig.iou_factor,
    cls_factor: float = YOLOv9LossConfig.cls_factor,
    assigner: Assigner = YOLOv9LossConfig.assigner,
) -> Assignment:
    """The assignment :func:`yolov9_loss` makes for the main outputs; arguments as there.

    Returns:
        :class:`Assignment`: ``fg_mask``, ``matched_gt`` (``-1`` for background), ``labels`` and
        ``scores`` ``(B, A)``; the soft class targets are ``one_hot(labels) * scores``.
    """
    _check_assigner(assigner)
    main, _ = _prepare(
        {"pred": pred}, {"gt": gt, "img_size": img_size}, reg_max=reg_max, num_classes=num_classes, aux=False
    )
    with autocast_off(main.levels[0].device):
        found = match(
            main.levels,
            main.grid,
            main.gts,
            reg_max=reg_max,
            topk=topk,
            iou_factor=iou_factor,
            cls_factor=cls_factor,
            assigner=assigner,
        )
    return found.to_assignment(main.gts)


class YOLOv9Loss(Criterion[YOLOv9LossConfig]):
    """YOLOv9 loss (NetsPresso Trainer / YOLO): task-aligned assignment, then BCE, CIoU and DFL terms.

    Batched over images and ground truths. The assignment scores every (ground truth, anchor) pair
    of an image by ``M = [anchor in box] CIoU^iou_factor sigmoid(logit_y)^cls_factor``, keeps the
    ``topk`` largest positive ``M`` per ground truth, gives an anchor kept twice to the ground truth
    of largest CIoU, and sets the soft class target ``M / max M * max CIoU`` per ground truth. The
    terms are divided by ``cls_norm = max(sum of the soft targets, cls_norm_min)``: ``cls =
    cls_weight sum BCE``, ``iou = iou_weight sum_fg (1 - CIoU) w``, ``dfl = dfl_weight sum_fg w DFL``.

    Inputs:
        out["pred"]: list over levels of ``(B, 4 R + C, H_l, W_l)``, or ``{"outputs", "aux_outputs"}``.
        target["gt"]: B dicts ``{"boxes": (n_i, 4) xyxy pixels, "labels": (n_i,) int64}``.
        target["img_size"]: ``H = W`` or ``(H, W)`` of the network input; stride ``W // W_l``.

    Reference: Wang et al., "YOLOv9", arXiv:2402.13616 (https://github.com/MultimediaTechLab/YOLO,
    ``yolo/tools/loss_functions.py``; NetsPresso Trainer ``losses/detection/yolov9.py``).
    """

    name: ClassVar[str] = NAME
    Config = YOLOv9LossConfig
    terms: ClassVar[tuple[str, ...]] = ("cls", "iou", "dfl")
    diagnostics: ClassVar[tuple[str, ...]] = ("num_fg", "cls_norm", "invalid_targets")
    inputs: ClassVar[Mapping[str, str]] = {
        "pred": "list over pyramid levels of (B, 4 reg_max + C, H_l, W_l) raw head outputs (side-major DFL "
        "logits, then class logits), or {'outputs': [...], 'aux_outputs': [...]}",
    }
    targets: ClassVar[Mapping[str, str]] = {
        "gt": "list of B dicts {'boxes': (n_i, 4) float xyxy in input pixels, 'labels': (n_i,) int64 in [0, C)}",
        "img_size": "int or (H, W) ints of the network input; level stride = W // W_l",
        "num_classes": "optional int C, checked against the channels of out['pred']",
    }

    def term_names(self) -> tuple[str, ...]:
        if self.config.aux_weight > 0:
            return (*self.terms, *(f"aux_{t}" for t in self.terms))
        return self.terms

    def _weights(self) -> _Weights:
        c = self.config
        return _Weights(
            c.reg_max,
            c.topk,
            c.iou_factor,
            c.cls_factor,
            c.cls_weight,
            c.dfl_weight,
            c.iou_weight,
            c.assigner,
            c.cls_norm_min,
            c.normalize_across_ranks,
        )

    def _prepare(self, out: Any, target: Any, aux: bool) -> tuple[_Batch, _Batch | None]:
        c = self.config
        return _prepare(out, target, reg_max=c.reg_max, num_classes=c.num_classes, aux=aux)

    def forward(self, out: Mapping[str, Any], target: Mapping[str, Any]) -> LossTerms:
        main, aux = self._prepare(out, target, self.config.aux_weight > 0)
        return _loss(main, aux, self._weights(), self.config.aux_weight)

    @torch.no_grad()
    def assign(self, out: Mapping[str, Any], target: Mapping[str, Any]) -> Assignment:
        """The assignment the loss makes for the main outputs.

        Returns:
            :class:`Assignment`: ``fg_mask (B, A)`` bool, ``matched_gt (B, A)`` int64 index into the
            image's ``gt`` (``-1`` for background), ``labels`` and ``scores (B, A)`` (soft class
            targets ``one_hot(labels) * scores``); anchors level by level, row-major.
        """
        main, _ = self._prepare(out, target, False)
        with autocast_off(main.levels[0].device):
            found = _match(main, self._weights())
        return found.to_assignment(main.gts)

    def example(
        self,
        batch_size: int = 2,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Three levels (8x8, 4x4, 2x2) of a 64x64 input, C = 3 (or ``num_classes``), 0-4 boxes each."""
        c = self.config.num_classes or 3
        r = self.config.reg_max
        img = 64
        gen = generator if generator is not None else torch.Generator().manual_seed(0)

        def levels() -> list[Tensor]:
            return [
                (torch.randn(batch_size, 4 * r + c, side, side, generator=gen) * 0.5)
                .to(device)
                .requires_grad_(True)
                for side in (8, 4, 2)
            ]

        main = levels()
        pred: Any = {"outputs": main, "aux_outputs": levels()} if self.config.aux_weight > 0 else main
        gt = example_gt(batch_size, img, c, generator=gen, device=device)
        return {"pred": pred}, {"gt": gt, "img_size": img}
