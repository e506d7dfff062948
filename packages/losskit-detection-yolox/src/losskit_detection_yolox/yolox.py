# SPDX-License-Identifier: Apache-2.0
"""The YOLOX loss (anchor-free decoupled head) with SimOTA label assignment.

Reference: Ge et al., "YOLOX: Exceeding YOLO Series in 2021", arXiv:2107.08430;
https://github.com/Megvii-BaseDetection/YOLOX (``yolox/models/yolo_head.py``, main).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_convert

from losskit import ConfigError, Criterion, InputError, LossTerms, option
from losskit.checks import (
    explain_non_finite,
    fmt_shape,
    get_box_targets,
    get_img_size,
    get_levels,
    integral_scalar,
    missing_key_error,
    value_checks_enabled,
)
from losskit.dist import global_mean
from losskit.tensors import autocast_off, example_gt
from losskit_detection_yolox._assign import (
    AnchorGrid,
    Assignment,
    CandidateAssignment,
    GroundTruths,
    find_candidates,
    simota_match,
)

__all__ = ["Assignment", "YOLOXLoss", "YOLOXLossConfig", "yolox_assign", "yolox_loss"]

NAME = "yolox_loss"
IouLossKind = Literal["iou", "giou"]
CandidateSlots = Literal["auto", "exact", "static"]
_IOU_KINDS = ("iou", "giou")
_SLOTS = ("auto", "exact", "static")
#: Added to ``w / stride`` inside the log of the L1 size targets (YOLOX's constant).
L1_LOG_EPS = 1e-8
#: Added to the union in the IoU loss (YOLOX's constant).
IOU_LOSS_EPS = 1e-16
#: Largest ``tw``/``th`` given to ``exp`` when decoding (a box ``e^20 ~ 5e8`` strides wide).
MAX_LOG_SIZE = 20.0


@dataclass(frozen=True)
class YOLOXLossConfig:
    """The fields of ``yolox_loss``: the only place their defaults are written (YOLOX's values)."""

    reg_weight: float = option(5.0, ge=0.0, doc="Weight of the IoU term.")
    center_radius: float = option(
        1.5, gt=0.0, doc="Centre-prior radius in strides: candidate cells lie within it of a box centre."
    )
    candidate_topk: int = option(10, ge=1, doc="Number of top IoUs summed for SimOTA's dynamic k.")
    iou_cost_weight: float = option(3.0, ge=0.0, doc="Weight of -log(IoU + 1e-8) in the assignment cost.")
    iou_loss: Literal["iou", "giou"] = option(
        "iou", doc="Box loss: 'iou' is 1 - IoU^2 (YOLOX's default), 'giou' is 1 - GIoU."
    )
    l1_activate_epoch: int = option(
        1, ge=0, doc="The L1 term is on once the epoch given to set_epoch is >= this (0 before any call)."
    )
    num_classes: int | None = option(
        None, ge=1, doc="Number of classes C; null infers it from the channels (5 + C) of out['pred']."
    )
    strides: tuple[float, ...] | None = option(
        None, gt=0.0, min_items=1, doc="Per-level strides in pixels; null derives them as img_size / W_l."
    )
    normalize_across_ranks: bool = option(
        False, doc="Divide by the foreground count averaged over torch.distributed ranks (off in YOLOX)."
    )
    candidate_slots: Literal["auto", "exact", "static"] = option(
        "auto",
        doc="Sizing of the candidate tensors: 'exact' reads the largest candidate count back "
        "(a device sync; least memory), 'static' uses a bound known on the host (no sync), "
        "'auto' is exact on CPU and static on accelerators and under torch.compile. The result is "
        "the same.",
    )


@dataclass(frozen=True)
class _Batch:
    """Validated inputs: the levels, their anchors and the padded ground truths."""

    levels: tuple[Tensor, ...]  # (B, 5 + C, H_l, W_l), the caller's tensors
    grid: AnchorGrid
    gts: GroundTruths  # N rows, (cx, cy, w, h) float32
    num_classes: int


def _levels(out: Any) -> list[Tensor]:
    key = "out['pred']"
    expected = "a list over pyramid levels of (B, 5 + C, H_l, W_l) raw head outputs"
    if not isinstance(out, Mapping):
        raise InputError(NAME, "out", f"expected a mapping with key 'pred', got {type(out).__name__}")
    if "pred" not in out:
        raise missing_key_error(NAME, "out", "pred", out, expected)
    return get_levels(
        out["pred"], key, criterion=NAME, shape="(B, 5 + C, H, W)", channels="5 + C", each=_check_channels
    )


def _check_channels(i: int, p: Tensor) -> None:
    if p.shape[1] < 6:
        raise InputError(
            NAME, f"out['pred'][{i}]", f"expected 5 + C channels with C >= 1, got shape {fmt_shape(p.shape)}"
        )


def check_finite_levels(levels: Sequence[Tensor], criterion: str) -> None:
    """With value checks on, an :class:`InputError` naming the first level holding NaN or inf."""
    if not value_checks_enabled(levels[0]):
        return
    for i, p in enumerate(levels):
        # the sum is non-finite when any value is (or, rarely, on overflow: then look closer)
        if not bool(torch.isfinite(p.detach().sum())):
            err = explain_non_finite(criterion, [(f"out['pred'][{i}]", p.detach())])
            if err is not None:
                raise err


def _to_device(t: Tensor, where: str, device: torch.device, dtype: torch.dtype, criterion: str) -> Tensor:
    """A target moved to the outputs' device (documented), or an error naming both when it cannot be."""
    try:
        return t.to(device=device, dtype=dtype)
    except (RuntimeError, NotImplementedError) as exc:
        raise InputError(
            criterion,
            where,
            f"is on {t.device}, but out['pred'][0] is on {device}, and it cannot be moved there ({exc})",
        ) from exc


def _check_gt_values(boxes: Tensor, labels: Tensor, where: str, num_classes: int, criterion: str) -> None:
    """Value checks of one image's ground truths (a read: only where value checks run)."""
    if labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise InputError(
                criterion,
                f"{where}['labels']",
                f"class {bad} is out of range; expected values in [0, {num_classes})",
            )
    if boxes.numel():
        if not bool(torch.isfinite(boxes).all()):
            raise explain_non_finite(criterion, [(f"{where}['boxes']", boxes)]) or InputError(
                criterion, f"{where}['boxes']", "contains non-finite values"
            )
        if bool(((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any()):
            raise InputError(criterion, f"{where}['boxes']", "expected x2 >= x1 and y2 >= y1 (xyxy boxes)")


def _ground_truths(
    target: Any, batch: int, num_classes: int, device: torch.device, criterion: str = NAME
) -> GroundTruths:
    """The batch's ground truths on the outputs' ``device`` (targets elsewhere are moved there).

    With value checks off, a box with a label outside ``[0, C)``, an inverted (``x2 < x1`` or
    ``y2 < y1``) or a non-finite box is kept as an invalid row (see :class:`GroundTruths`): it takes
    part in nothing and is counted in the ``invalid_targets`` diagnostic. Zero-width or zero-height
    boxes are valid, as in YOLOX (their IoU with any prediction is 0).
    """
    all_boxes, all_labels = get_box_targets(target, criterion=criterion, batch=batch, batch_of="out['pred']")
    boxes_list, labels_list = [], []
    for i, (boxes, labels) in enumerate(zip(all_boxes, all_labels)):
        where = f"target['gt'][{i}]"
        boxes = _to_device(boxes, f"{where}['boxes']", device, torch.float32, criterion)
        labels = _to_device(labels, f"{where}['labels']", device, torch.int64, criterion)
        if value_checks_enabled(boxes):
            _check_gt_values(boxes, labels, where, num_classes, criterion)
        boxes_list.append(boxes)
        labels_list.append(labels)
    counts = tuple(int(b.shape[0]) for b in boxes_list)
    # the image of each row, made on the device (no host-to-device copy)
    image = [torch.full((n,), i, dtype=torch.int64, device=device) for i, n in enumerate(counts)]
    xyxy = torch.cat([torch.zeros(0, 4, device=device), *boxes_list])
    labels = torch.cat([torch.zeros(0, dtype=torch.int64, device=device), *labels_list])
    valid = (
        torch.isfinite(xyxy).all(1)
        & (xyxy[:, 2] >= xyxy[:, 0])
        & (xyxy[:, 3] >= xyxy[:, 1])
        & (labels >= 0)
        & (labels < num_classes)
    )
    return GroundTruths(
        box_convert(torch.where(valid[:, None], xyxy, 0.0), "xyxy", "cxcywh"),
        torch.where(valid, labels, 0),
        torch.cat([torch.zeros(0, dtype=torch.int64, device=device), *image]),
        counts,
        valid,
    )


def _check_num_classes(
    target: Mapping[str, Any], c: int, num_classes: int | None, criterion: str = NAME
) -> None:
    """``C`` from the channels against the config's ``num_classes`` and the optional
    ``target['num_classes']``."""
    if num_classes is not None and num_classes != c:
        raise InputError(
            criterion, "out['pred'][0]", f"expected 5 + num_classes = {num_classes + 5} channels, got {c + 5}"
        )
    given = target.get("num_classes")
    if given is not None:
        if integral_scalar(given) is None and not (isinstance(given, float) and given.is_integer()):
            raise InputError(criterion, "target['num_classes']", f"expected an int, got {given!r}")
        if int(given) != c:
            raise InputError(
                criterion,
                "target['num_classes']",
                f"{given} does not match the {c + 5} channels of out['pred'] (5 + C with C = {c})",
            )


def _prepare(
    out: Any,
    target: Any,
    *,
    num_classes: int | None,
    strides: Sequence[float] | None,
) -> _Batch:
    levels = _levels(out)
    if not isinstance(target, Mapping):
        raise InputError(
            NAME, "target", f"expected a mapping with keys 'gt', 'img_size', got {type(target).__name__}"
        )
    c = levels[0].shape[1] - 5
    _check_num_classes(target, c, num_classes)
    img_h, img_w = get_img_size(target, criterion=NAME)
    shapes = [(int(p.shape[2]), int(p.shape[3])) for p in levels]
    if strides is not None:
        if len(strides) != len(levels):
            raise InputError(
                NAME, "out['pred']", f"got {len(levels)} levels but the config gives {len(strides)} strides"
            )
        level_strides = [(float(s), float(s)) for s in strides]
    else:
        level_strides = [(img_h / h, img_w / w) for h, w in shapes]
    device = levels[0].device
    batch = int(levels[0].shape[0])
    check_finite_levels(levels, NAME)
    gts = _ground_truths(target, batch, c, device)
    grid = AnchorGrid.build(shapes, level_strides, device)
    return _Batch(tuple(levels), grid, gts, c)


def _read_levels(index: Tensor, dtype: torch.dtype, levels: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """The forward of :class:`_Take`: objectness ``(B, A)`` and the channels at ``index`` ``(B, 5 + C, N)``."""
    b, n = index.shape
    ch = levels[0].shape[1]
    picked = levels[0].new_zeros(b, ch, n)
    objectness = []
    start = 0
    for p in levels:
        flat = p.flatten(2)
        size = flat.shape[2]
        objectness.append(flat[:, 4])
        local = index - start
        inside = (local >= 0) & (local < size)
        got = flat.gather(2, local.clamp(0, size - 1)[:, None, :].expand(b, ch, n))
        picked = torch.where(inside[:, None, :], got, picked)
        start += size
    return torch.cat(objectness, 1).to(dtype), picked.to(dtype)


class _Take(torch.autograd.Function):
    """The objectness of every anchor ``(B, A)`` and all channels at some anchors ``(B, 5 + C, N)``,
    read straight from the pyramid levels, in ``dtype``.

    Backward writes each level's gradient into one buffer of the level's shape: no concatenated copy
    of the head outputs and no extra full-size gradient tensors (plain ``cat`` + ``gather`` +
    ``select`` would make three and add them up).
    """

    @staticmethod
    def forward(ctx: Any, index: Tensor, dtype: torch.dtype, *levels: Tensor) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(index)
        ctx.shapes = [p.shape for p in levels]
        ctx.dtypes = [p.dtype for p in levels]
        return _read_levels(index, dtype, levels)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g_obj: Tensor | None, g_picked: Tensor | None) -> tuple[Tensor | None, ...]:
        (index,) = ctx.saved_tensors
        b, n = index.shape
        grads: list[Tensor | None] = [None, None]
        start = 0
        for i, (shape, dtype) in enumerate(zip(ctx.shapes, ctx.dtypes)):
            ch, size = shape[1], shape[2] * shape[3]
            if not ctx.needs_input_grad[2 + i]:
                grads.append(None)
                start += size
                continue
            work = torch.float64 if dtype == torch.float64 else torch.float32
            grad = torch.zeros(b, ch, size, dtype=work, device=index.device)
            if g_obj is not None:
                grad[:, 4] = g_obj[:, start : start + size]
            if g_picked is not None:
                local = index - start
                inside = (local >= 0) & (local < size)
                src = torch.where(inside[:, None, :], g_picked, 0.0).to(grad.dtype)
                grad.scatter_add_(2, local.clamp(0, size - 1)[:, None, :].expand(b, ch, n), src)
            grads.append(grad.view(shape).to(dtype))
            start += size
        return tuple(grads)


def _take(batch: _Batch, index: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(objectness (B, A), channels at index (B, 5 + C, N))`` of the batch's levels, in ``dtype``."""
    if not torch.is_grad_enabled():
        # the assignment needs no graph (and torch.compile fails on this autograd function under
        # no_grad when it is given exactly two levels, as YOLO-Fastest's head gives)
        return _read_levels(index, dtype, batch.levels)
    out = _Take.apply(index, dtype, *batch.levels)
    return out[0], out[1]


def _decode(reg: Tensor, x: Tensor, y: Tensor, sx: Tensor, sy: Tensor) -> Tensor:
    """Raw ``(B, 4, N)`` regression to ``(B, N, 4)`` boxes ``(cx, cy, w, h)`` in pixels.

    ``tw, th`` are clamped at :data:`MAX_LOG_SIZE` before ``exp`` so that box areas stay finite in
    float32 (YOLOX does not clamp; its gradients become NaN beyond about 44).
    """
    cx = (reg[:, 0] + x) * sx
    cy = (reg[:, 1] + y) * sy
    w = torch.exp(reg[:, 2].clamp(max=MAX_LOG_SIZE)) * sx
    h = torch.exp(reg[:, 3].clamp(max=MAX_LOG_SIZE)) * sy
    return torch.stack((cx, cy, w, h), dim=-1)


#: Decodes raw ``(B, 4, N)`` regression at anchors ``(B, N)`` of a grid into ``(B, N, 4)`` boxes
#: ``(cx, cy, w, h)`` in pixels; the one part of the assignment and the terms that depends on the head.
Decode = Callable[[Tensor, AnchorGrid, Tensor], Tensor]


def _decode_cells(reg: Tensor, grid: AnchorGrid, index: Tensor) -> Tensor:
    """YOLOX's decode (:func:`_decode`) at the grid cells ``index`` ``(B, N)``, in ``reg``'s dtype."""
    i = index
    dt = reg.dtype
    return _decode(reg, grid.x[i].to(dt), grid.y[i].to(dt), grid.stride_x[i].to(dt), grid.stride_y[i].to(dt))


def _iou_loss(pred: Tensor, target: Tensor, kind: str) -> Tensor:
    """Elementwise IoU loss of ``(..., 4)`` ``(cx, cy, w, h)`` boxes: ``1 - IoU^2`` or ``1 - GIoU``."""
    p_lo, p_hi = pred[..., :2] - pred[..., 2:] / 2, pred[..., :2] + pred[..., 2:] / 2
    t_lo, t_hi = target[..., :2] - target[..., 2:] / 2, target[..., :2] + target[..., 2:] / 2
    lo = torch.maximum(p_lo, t_lo)
    hi = torch.minimum(p_hi, t_hi)
    overlap = (lo < hi).all(-1)
    side = hi - lo
    # products written out (a prod's backward divides by its result, NaN where that is inf) and a
    # where, not a product with the mask: boxes ~1e19 px away would give inf * 0 = NaN
    inter = torch.where(overlap, side[..., 0] * side[..., 1], 0.0)
    union = pred[..., 2] * pred[..., 3] + target[..., 2] * target[..., 3] - inter
    iou = inter / (union + IOU_LOSS_EPS)
    if kind == "iou":
        return 1 - iou**2
    span = torch.maximum(p_hi, t_hi) - torch.minimum(p_lo, t_lo)
    hull = (span[..., 0] * span[..., 1]).clamp(min=IOU_LOSS_EPS, max=torch.finfo(span.dtype).max)
    giou = iou - (hull - union) / hull
    return 1 - giou.clamp(min=-1.0, max=1.0)


@torch.no_grad()
def _assign(
    batch: _Batch,
    *,
    center_radius: float,
    candidate_topk: int,
    iou_cost_weight: float,
    candidate_slots: str,
    decode: Decode = _decode_cells,
) -> CandidateAssignment:
    grid = batch.grid
    cand = find_candidates(
        batch.gts,
        len(batch.gts.counts),
        grid,
        center_radius=center_radius,
        capacity=candidate_slots,  # type: ignore[arg-type]
    )
    _, picked = _take(batch, cand.index, torch.float32)  # (B, 5 + C, K)
    boxes = decode(picked[:, :4], grid, cand.index)
    return simota_match(
        cand,
        boxes,
        picked[:, 5:],
        picked[:, 4],
        batch.gts,
        grid,
        center_radius=center_radius,
        candidate_topk=candidate_topk,
        iou_cost_weight=iou_cost_weight,
    )


def _diagnostics(num_fg: Tensor, use_l1: bool, gts: GroundTruths) -> dict[str, Tensor]:
    invalid = (
        torch.zeros((), device=num_fg.device)
        if gts.valid is None
        else gts.valid.numel() - gts.valid.sum().to(torch.float32)
    )
    return {
        "num_fg": num_fg,
        "l1_active": torch.full((), float(use_l1), device=num_fg.device),
        "invalid_targets": invalid,
    }


def _terms(
    batch: _Batch,
    cand: CandidateAssignment,
    *,
    reg_weight: float,
    iou_loss: str,
    use_l1: bool,
    candidate_topk: int,
    normalize_across_ranks: bool,
    decode: Decode = _decode_cells,
) -> LossTerms:
    # float32 (float64 inputs stay float64, e.g. for gradcheck); the assignment is always float32
    work = torch.float64 if batch.levels[0].dtype == torch.float64 else torch.float32
    grid = batch.grid
    b, a, k = cand.index.shape[0], grid.num_anchors, cand.index.shape[1]
    device = cand.index.device
    fg = cand.fg & cand.valid
    num_fg = fg.sum().to(torch.float32)
    norm = global_mean(num_fg, enabled=normalize_across_ranks, min=1.0)

    # Foreground anchors are at most candidate_topk per ground truth: compact them into the first
    # F slots (stable, so anchor order is kept) and compute the box and class terms there only.
    f = min(k, batch.gts.max_count * candidate_topk)
    slots = torch.sort(fg.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :f]
    fg = fg.gather(1, slots)
    anchor = cand.index.gather(1, slots)
    obj_logits, picked = _take(batch, anchor, work)  # (B, A), (B, 5 + C, F)

    # objectness over every anchor; target = foreground mask
    dest = torch.where(fg, anchor, a)
    fg_full = torch.zeros(b, a + 1, dtype=work, device=device)
    fg_full.scatter_(1, dest, fg.to(work))
    obj = F.binary_cross_entropy_with_logits(obj_logits, fg_full[:, :a], reduction="sum") / norm
    if f == 0:  # no candidate anywhere (no ground truth): objectness only, graph intact
        zero = picked.sum() * 0.0
        terms = {"iou": zero, "obj": obj, "cls": zero, "l1": zero}
        return LossTerms(terms, _diagnostics(num_fg, use_l1, batch.gts))

    row = cand.matched_row.gather(1, slots).clamp(min=0)
    matched_iou = cand.matched_iou.gather(1, slots)
    x, y = grid.x[anchor].to(work), grid.y[anchor].to(work)
    sx, sy = grid.stride_x[anchor].to(work), grid.stride_y[anchor].to(work)
    gt_box = batch.gts.boxes[row].to(work)  # (B, F, 4)

    boxes = decode(picked[:, :4], grid, anchor)
    iou_sum = torch.where(fg, _iou_loss(boxes, gt_box, iou_loss), 0.0).sum()
    iou = reg_weight * (iou_sum / norm)

    labels = batch.gts.labels[row]
    cls_target = torch.zeros_like(picked[:, 5:])
    cls_target.scatter_(1, labels[:, None, :], matched_iou[:, None, :].to(work))
    cls_each = F.binary_cross_entropy_with_logits(picked[:, 5:], cls_target, reduction="none").sum(1)
    cls = torch.where(fg, cls_each, 0.0).sum() / norm

    if use_l1:
        l1_target = torch.stack(
            (
                gt_box[..., 0] / sx - x,
                gt_box[..., 1] / sy - y,
                torch.log(gt_box[..., 2].clamp(min=0) / sx + L1_LOG_EPS),
                torch.log(gt_box[..., 3].clamp(min=0) / sy + L1_LOG_EPS),
            ),
            dim=1,
        )  # (B, 4, F)
        l1_each = (picked[:, :4] - l1_target).abs().sum(1)
        l1 = torch.where(fg, l1_each, 0.0).sum() / norm
    else:
        l1 = picked[:, :4].sum() * 0.0
    terms = {"iou": iou, "obj": obj, "cls": cls, "l1": l1}
    return LossTerms(terms, _diagnostics(num_fg, use_l1, batch.gts))


def _check_choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{NAME}.{field}: got {value!r}; allowed: {', '.join(map(repr, allowed))}")


def yolox_assign(
    pred: Sequence[Tensor],
    gt: Sequence[Mapping[str, Tensor]],
    img_size: int | tuple[int, int],
    *,
    num_classes: int | None = YOLOXLossConfig.num_classes,
    center_radius: float = YOLOXLossConfig.center_radius,
    candidate_topk: int = YOLOXLossConfig.candidate_topk,
    iou_cost_weight: float = YOLOXLossConfig.iou_cost_weight,
    strides: Sequence[float] | None = YOLOXLossConfig.strides,
    candidate_slots: CandidateSlots = YOLOXLossConfig.candidate_slots,
) -> Assignment:
    """SimOTA assignment of YOLOX for a batch; see :func:`yolox_loss` for the arguments.

    Returns:
        :class:`Assignment` with ``(B, A)`` foreground mask, matched ground-truth index (``-1`` for
        background) and matched IoU, anchors flattened level by level, row-major.
    """
    _check_choice("candidate_slots", candidate_slots, _SLOTS)
    batch = _prepare(
        {"pred": pred}, {"gt": gt, "img_size": img_size}, num_classes=num_classes, strides=strides
    )
    with autocast_off(batch.levels[0].device):
        cand = _assign(
            batch,
            center_radius=center_radius,
            candidate_topk=candidate_topk,
            iou_cost_weight=iou_cost_weight,
            candidate_slots=candidate_slots,
        )
    return cand.to_anchors(batch.grid.num_anchors)


def yolox_loss(
    pred: Sequence[Tensor],
    gt: Sequence[Mapping[str, Tensor]],
    img_size: int | tuple[int, int],
    *,
    num_classes: int | None = YOLOXLossConfig.num_classes,
    use_l1: bool = False,
    reg_weight: float = YOLOXLossConfig.reg_weight,
    center_radius: float = YOLOXLossConfig.center_radius,
    candidate_topk: int = YOLOXLossConfig.candidate_topk,
    iou_cost_weight: float = YOLOXLossConfig.iou_cost_weight,
    iou_loss: IouLossKind = YOLOXLossConfig.iou_loss,
    strides: Sequence[float] | None = YOLOXLossConfig.strides,
    normalize_across_ranks: bool = YOLOXLossConfig.normalize_across_ranks,
    candidate_slots: CandidateSlots = YOLOXLossConfig.candidate_slots,
) -> LossTerms:
    """The YOLOX loss of a batch: SimOTA assignment, then IoU, objectness, class and L1 terms.

    Args:
        pred: per pyramid level, raw training-mode head outputs ``(B, 5 + C, H_l, W_l)`` with channels
            ``[tx, ty, tw, th, obj, cls_0 .. cls_{C-1}]`` (no sigmoid, no decoding). Anchors are the grid
            cells, flattened level by level, row-major; a cell decodes to
            ``cx = (tx + x) s``, ``cy = (ty + y) s``, ``w = exp(tw) s``, ``h = exp(th) s``.
        gt: B dicts ``{"boxes": (n_i, 4) xyxy in input pixels, "labels": (n_i,) int in [0, C)}``;
            ``n_i`` may be 0.
        img_size: ``H = W`` or ``(H, W)`` of the network input; the stride of level ``l`` is
            ``W / W_l`` along x and ``H / H_l`` along y unless ``strides`` is given.
        num_classes: C, checked against the channels when given.
        use_l1: add the L1 term on the raw regression (YOLOX turns it on for the last epochs).
        reg_weight: weight of the IoU term.
        center_radius: centre-prior radius in strides.
        candidate_topk: IoUs summed for SimOTA's dynamic k.
        iou_cost_weight: weight of ``-log(IoU + 1e-8)`` in the assignment cost.
        iou_loss: ``"iou"`` (``1 - IoU^2``) or ``"giou"`` (``1 - GIoU``).
        strides: per-level strides overriding ``img_size / W_l``.
        normalize_across_ranks: divide by the foreground count averaged over data-parallel ranks.
        candidate_slots: how the candidate tensors are sized: ``"exact"`` reads the largest
            candidate count back to the host (a synchronisation on accelerators; least memory),
            ``"static"`` uses a bound known on the host (no synchronisation), ``"auto"`` is exact for
            CPU tensors and static otherwise. The result does not depend on it.

    Returns:
        :class:`losskit.LossTerms` with the scalar terms ``iou``, ``obj``, ``cls``, ``l1`` (float32),
        each divided by ``num_fg = max(foreground anchors of the batch, 1)``: ``iou = reg_weight *
        sum_fg loss_iou``, ``obj = sum over all anchors of BCE(obj, fg)``, ``cls = sum_fg sum_c
        BCE(cls_c, onehot_c * IoU)``, ``l1 = sum_fg |raw reg - encoded target|`` (0 when off); and the
        diagnostics ``num_fg`` (foreground anchors, before the clamp) and ``l1_active``.
    """
    _check_choice("iou_loss", iou_loss, _IOU_KINDS)
    _check_choice("candidate_slots", candidate_slots, _SLOTS)
    batch = _prepare(
        {"pred": pred}, {"gt": gt, "img_size": img_size}, num_classes=num_classes, strides=strides
    )
    return _loss_of_batch(
        batch,
        use_l1=use_l1,
        reg_weight=reg_weight,
        center_radius=center_radius,
        candidate_topk=candidate_topk,
        iou_cost_weight=iou_cost_weight,
        iou_loss=iou_loss,
        normalize_across_ranks=normalize_across_ranks,
        candidate_slots=candidate_slots,
    )


def _loss_of_batch(
    batch: _Batch,
    *,
    use_l1: bool,
    reg_weight: float,
    center_radius: float,
    candidate_topk: int,
    iou_cost_weight: float,
    iou_loss: str,
    normalize_across_ranks: bool,
    candidate_slots: str,
) -> LossTerms:
    with autocast_off(batch.levels[0].device):
        cand = _assign(
            batch,
            center_radius=center_radius,
            candidate_topk=candidate_topk,
            iou_cost_weight=iou_cost_weight,
            candidate_slots=candidate_slots,
        )
        return _terms(
            batch,
            cand,
            reg_weight=reg_weight,
            iou_loss=iou_loss,
            use_l1=use_l1,
            candidate_topk=candidate_topk,
            normalize_across_ranks=normalize_across_ranks,
        )


class YOLOXLoss(Criterion[YOLOXLossConfig]):
    """YOLOX loss: SimOTA assignment, then IoU, objectness, class and L1 terms over foreground anchors.

    Batched over images (no Python loop over images or ground truths). The terms are each divided by
    ``num_fg = max(foreground anchors in the batch, 1)`` (averaged over data-parallel ranks first when
    ``normalize_across_ranks``): ``iou = reg_weight * sum_fg (1 - IoU^2)`` (or ``1 - GIoU``),
    ``obj = sum over all anchors of BCE(obj, fg)``, ``cls = sum_fg sum_c BCE(cls_c, onehot_c * IoU)``,
    ``l1 = sum_fg |raw reg - [cx/s - x, cy/s - y, log(w/s + 1e-8), log(h/s + 1e-8)]|`` once the epoch
    given to ``set_epoch`` reaches ``l1_activate_epoch`` (0 before). All four are float32.

    Inputs:
        out["pred"]: list over levels of raw head outputs ``(B, 5 + C, H_l, W_l)``.
        target["gt"]: B dicts ``{"boxes": (n_i, 4) xyxy pixels, "labels": (n_i,) int64}``.
        target["img_size"]: ``H = W`` or ``(H, W)`` of the network input.

    Reference: Ge et al., "YOLOX: Exceeding YOLO Series in 2021", arXiv:2107.08430
    (https://github.com/Megvii-BaseDetection/YOLOX, ``yolox/models/yolo_head.py``).
    """

    name = NAME
    terms = ("iou", "obj", "cls", "l1")
    diagnostics = ("num_fg", "l1_active", "invalid_targets")
    inputs = {
        "pred": "list over pyramid levels of (B, 5 + C, H_l, W_l) raw head outputs "
        "[tx, ty, tw, th, obj, cls_0..cls_{C-1}]",
    }
    targets = {
        "gt": "list of B dicts {'boxes': (n_i, 4) float xyxy in input pixels, 'labels': (n_i,) int64 in [0, C)}",
        "img_size": "int or (H, W) of the network input; level stride = img_size / W_l",
        "num_classes": "optional int C, checked against the channels of out['pred']",
    }

    Config = YOLOXLossConfig

    @property
    def l1_active(self) -> bool:
        """Whether the L1 term is on for the current epoch."""
        return self.epoch >= self.config.l1_activate_epoch

    def _batch(self, out: Any, target: Any) -> _Batch:
        return _prepare(out, target, num_classes=self.config.num_classes, strides=self.config.strides)

    def forward(self, out: Mapping[str, Any], target: Mapping[str, Any]) -> LossTerms:
        cfg = self.config
        return _loss_of_batch(
            self._batch(out, target),
            use_l1=self.l1_active,
            reg_weight=cfg.reg_weight,
            center_radius=cfg.center_radius,
            candidate_topk=cfg.candidate_topk,
            iou_cost_weight=cfg.iou_cost_weight,
            iou_loss=cfg.iou_loss,
            normalize_across_ranks=cfg.normalize_across_ranks,
            candidate_slots=cfg.candidate_slots,
        )

    @torch.no_grad()
    def assign(self, out: Mapping[str, Any], target: Mapping[str, Any]) -> Assignment:
        """The SimOTA assignment the loss would use, per image and anchor.

        Returns:
            :class:`Assignment`: ``fg_mask (B, A)`` bool, ``matched_gt (B, A)`` int64 index into the
            image's ``gt`` (``-1`` for background), ``matched_iou (B, A)`` float32; anchors flattened
            level by level, row-major.
        """
        cfg = self.config
        batch = self._batch(out, target)
        with autocast_off(batch.levels[0].device):
            cand = _assign(
                batch,
                center_radius=cfg.center_radius,
                candidate_topk=cfg.candidate_topk,
                iou_cost_weight=cfg.iou_cost_weight,
                candidate_slots=cfg.candidate_slots,
            )
        return cand.to_anchors(batch.grid.num_anchors)

    def example(
        self,
        batch_size: int = 2,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Three levels (8x8, 4x4, 2x2) of a 64x64 input, C = 3 (or ``num_classes``), 0-4 boxes each."""
        c = self.config.num_classes or 3
        img = 64
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        pred = []
        for side in (8, 4, 2):
            level = torch.randn(batch_size, 5 + c, side, side, generator=gen) * 0.5
            pred.append(level.to(device).requires_grad_(True))
        gt = example_gt(batch_size, img, c, generator=gen, device=device)
        return {"pred": pred}, {"gt": gt, "img_size": img}
