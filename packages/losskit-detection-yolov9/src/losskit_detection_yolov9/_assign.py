# SPDX-License-Identifier: Apache-2.0
"""Anchors, box decoding and the batched task-aligned matcher of YOLOv9.

Ground truths of the whole batch are rows of one flat table (no padding to the largest image); each
row is scored against every anchor of its image in a ``(G, A)`` matrix, built in row chunks so that
the temporaries of the CIoU stay bounded. Per-anchor decisions (duplicates, the final owner) are
reductions of those rows into ``(B, A)`` by image index: no Python loop over images or ground truths.

Memory of one assignment: ``G x A`` float32 CIoU and score matrices plus a few ``G x A`` bool and
float32 temporaries of the reductions (about 25 bytes per pair: about 100 MB for 500 ground truths at
8400 anchors), and about 40 float32 temporaries of ``2^18`` values for a chunk's CIoU (about 40 MB).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from losskit_ops import YoloBoxParts, yolo_box_parts, yolo_pairwise_ciou_

__all__ = ["AnchorGrid", "Assignment", "GroundTruths", "Match", "decode_levels", "match"]

Assigner = Literal["netspresso", "upstream"]
#: Added to the per-gt maximum score before dividing by it (YOLO's constant).
NORM_EPS = 1e-9
#: The upper clamp of DFL targets and the reach test of the upstream matcher are ``reg_max - REACH_MARGIN``.
REACH_MARGIN = 1.01
#: Rows of the ``(G, A)`` matrices computed at once: ``chunk x A`` stays under this many pairs.
CHUNK_PAIRS = 1 << 18
#: ``1 / ln 2``: ``exp(x) = 2^(x / ln 2)``.
LOG2_E = 1.4426950408889634


@dataclass(frozen=True)
class AnchorGrid:
    """Anchor centres of all levels, flattened level by level, row-major."""

    x: Tensor  # (A,) float32, pixels
    y: Tensor  # (A,)
    stride: Tensor  # (A,) float32
    sizes: tuple[int, ...]  # anchors per level

    @property
    def num_anchors(self) -> int:
        return int(self.x.shape[0])

    @staticmethod
    def build(shapes: Sequence[tuple[int, int]], strides: Sequence[int], device: torch.device) -> AnchorGrid:
        """Centres ``(x s + s // 2, y s + s // 2)`` for each level of grid ``(H_l, W_l)`` and stride ``s``."""
        xs, ys, ss, sizes = [], [], [], []
        for (h, w), s in zip(shapes, strides):
            gy, gx = torch.meshgrid(
                torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
            )
            xs.append((gx.reshape(-1) * s + s // 2).to(torch.float32))
            ys.append((gy.reshape(-1) * s + s // 2).to(torch.float32))
            ss.append(torch.full((h * w,), float(s), device=device))
            sizes.append(h * w)
        return AnchorGrid(torch.cat(xs), torch.cat(ys), torch.cat(ss), tuple(sizes))


@dataclass(frozen=True)
class GroundTruths:
    """The batch's ground truths as one table of ``G`` rows, ordered by image then by position."""

    boxes: Tensor  # (G, 4) float32 xyxy pixels; invalid rows zeroed
    labels: Tensor  # (G,) int64; invalid rows clamped into range
    image: Tensor  # (G,) int64 image of each row
    local: Tensor  # (G,) int64 index of the row in its image's list
    valid: Tensor  # (G,) bool: finite, x2 >= x1, y2 >= y1, label in [0, C)
    counts: tuple[int, ...]  # rows per image (known on the host)

    @property
    def max_count(self) -> int:
        return max(self.counts, default=0)


@dataclass(frozen=True)
class Assignment:
    """The assignment of one batch, per image and anchor (anchors flattened level by level, row-major).

    Attributes:
        fg_mask: ``(B, A)`` bool, anchors with a ground truth.
        matched_gt: ``(B, A)`` int64 index into the image's ``gt`` list, ``-1`` for background.
        labels: ``(B, A)`` int64 class of the matched ground truth, ``-1`` for background.
        scores: ``(B, A)`` float32 soft class target at ``labels`` (0 for background); the soft
            class targets are ``one_hot(labels) * scores``, see :meth:`class_targets`.
    """

    fg_mask: Tensor
    matched_gt: Tensor
    labels: Tensor
    scores: Tensor

    def class_targets(self, num_classes: int) -> Tensor:
        """The dense ``(B, A, num_classes)`` float32 soft class targets (allocates ``B A C`` floats)."""
        dense = self.scores.new_zeros(*self.scores.shape, num_classes)
        dense.scatter_(2, self.labels.clamp(min=0)[..., None], self.scores[..., None])
        return dense


@dataclass(frozen=True)
class Match:
    """Internal result of :func:`match`: ``owner`` is the flat ground-truth row of each anchor."""

    owner: Tensor  # (B, A) int64 row into GroundTruths, -1 for background
    scores: Tensor  # (B, A) float32 soft target value

    @property
    def fg(self) -> Tensor:
        return self.owner >= 0

    def to_assignment(self, gts: GroundTruths) -> Assignment:
        fg = self.fg
        row = self.owner.clamp(min=0)
        if gts.labels.numel() == 0:
            minus = torch.full_like(self.owner, -1)
            return Assignment(fg, minus, minus.clone(), self.scores)
        matched = torch.where(fg, gts.local[row], -1)
        labels = torch.where(fg, gts.labels[row], -1)
        return Assignment(fg, matched, labels, self.scores)


def decode_distances(logits: Tensor, reg_max: int) -> Tensor:
    """Expected distances ``sum_r r softmax(logits)_r`` over the bins of ``(B, 4, R, N)`` logits: ``(B, 4, N)``."""
    bins = torch.arange(reg_max, dtype=logits.dtype, device=logits.device).view(1, 1, reg_max, 1)
    weighted = logits.softmax(2)
    return (weighted.mul_(bins) if not weighted.requires_grad else weighted * bins).sum(2)


@torch.no_grad()
def _expected_bins(logits: Tensor, reg_max: int) -> Tensor:
    """:func:`decode_distances` without gradient, reading a strided view once: ``sum_r r e_r / sum_r e_r``
    with ``e = 2^((logits - max) / ln 2)`` (one buffer; ``exp2`` is several times faster than ``exp``
    on CPU)."""
    e = (logits - logits.amax(2, keepdim=True)).mul_(LOG2_E).exp2_()
    total = e.sum(2)
    bins = torch.arange(reg_max, dtype=e.dtype, device=e.device).view(1, 1, reg_max, 1)
    return e.mul_(bins).sum(2).div_(total)


@torch.no_grad()
def decode_levels(levels: Sequence[Tensor], grid: AnchorGrid, reg_max: int) -> Tensor:
    """Detached float32 predicted boxes ``(B, 4, A)`` xyxy in pixels of every anchor."""
    dists = []
    for p in levels:
        b = p.shape[0]
        reg = p[:, : 4 * reg_max].detach().to(torch.float32).reshape(b, 4, reg_max, -1)
        # side by side: each chunk's buffer stays in cache through its passes
        dists.append(torch.cat([_expected_bins(reg[:, i : i + 1], reg_max) for i in range(4)], 1))
    d = torch.cat(dists, 2) * grid.stride
    return torch.stack((grid.x - d[:, 0], grid.y - d[:, 1], grid.x + d[:, 2], grid.y + d[:, 3]), 1)


def _class_logits(levels: Sequence[Tensor], image: Tensor, channel: Tensor) -> Tensor:
    """``(g, A)`` float32 logits of channel ``channel[i]`` of image ``image[i]`` at every anchor."""
    rows = []
    for p in levels:
        b, ch = p.shape[:2]
        flat = p.detach().reshape(b * ch, -1)
        rows.append(flat.index_select(0, image * ch + channel).to(torch.float32))
    return torch.cat(rows, 1)


def _power(x: Tensor, exponent: float) -> Tensor:
    """``x ** exponent``; an integer exponent in ``[1, 8]`` by squaring (``pow`` is far slower on CPU)."""
    if not float(exponent).is_integer() or not 1 <= exponent <= 8:
        return torch.pow(x, exponent)
    n = int(exponent)
    result = None
    base = x
    while n:
        if n & 1:
            result = base.clone() if result is None else result.mul_(base)
        n >>= 1
        if n:
            base = base.square()
    return x if result is None else result


def _scores(
    levels: Sequence[Tensor],
    grid: AnchorGrid,
    pred: YoloBoxParts,
    gts: GroundTruths,
    rows: slice,
    *,
    reg_max: int,
    iou_factor: float,
    cls_factor: float,
    assigner: Assigner,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """CIoU, score ``M`` and (upstream only, None for NetsPresso) anchor-in-box mask ``(g, A)`` of
    ground-truth rows ``rows``."""
    image = gts.image[rows]
    box = gts.boxes[rows]
    valid = gts.valid[rows, None]
    x1, y1, x2, y2 = (box[:, i : i + 1] for i in range(4))
    # in-place arithmetic throughout: few (g, A) buffers (allocation dominates on CPU otherwise)
    iou = yolo_pairwise_ciou_(
        yolo_box_parts(x1, y1, x2, y2), YoloBoxParts(*(t.index_select(0, image) for t in pred))
    )
    iou.clamp_(0, 1).mul_(valid)
    score = _power(iou, iou_factor)
    score.mul_(_class_logits(levels, image, gts.labels[rows] + 4 * reg_max).sigmoid_().pow_(cls_factor))
    if assigner == "netspresso":
        # outside the box (strictly inside is x1 < x < x2, y1 < y < y2); finite values, so the
        # complement of < is >=; the matcher needs no mask afterwards
        outside = x1 >= grid.x
        test = torch.ge(grid.x, x2)
        outside |= test
        outside |= torch.ge(y1, grid.y, out=test)
        outside |= torch.ge(grid.y, y2, out=test)
        return iou, score.masked_fill_(outside, 0.0), None
    else:
        near = grid.x - x1
        side = grid.y - y1
        far = torch.maximum(near, side)
        torch.minimum(near, side, out=near)
        for other in (x2 - grid.x, y2 - grid.y):
            torch.maximum(far, other, out=far)
            torch.minimum(near, other, out=near)
        # division by the stride is monotonic: max(d / s) == max(d) / s exactly
        inside = (near >= 0) & (far.div_(grid.stride) <= reg_max - REACH_MARGIN)
    return iou, score, inside.logical_and_(valid)


@torch.no_grad()
def match(
    levels: Sequence[Tensor],
    grid: AnchorGrid,
    gts: GroundTruths,
    *,
    reg_max: int,
    topk: int,
    iou_factor: float,
    cls_factor: float,
    assigner: Assigner,
) -> Match:
    """Task-aligned assignment of a batch (NetsPresso's matcher, or upstream's revised one).

    Args:
        levels: per level ``(B, 4 R + C, H_l, W_l)`` head outputs (read detached).
        grid: the anchors of ``levels``.
        gts: the batch's ground truths.
        reg_max: R, the DFL bins per side.
        topk: anchors kept per ground truth.
        iou_factor, cls_factor: exponents of CIoU and class probability in the score.
        assigner: ``"netspresso"`` or ``"upstream"`` (see the criterion's documentation).

    Returns:
        :class:`Match` with the owner row and soft target value of every anchor.
    """
    b, a = int(levels[0].shape[0]), grid.num_anchors
    device = grid.x.device
    g = int(gts.boxes.shape[0])
    if g == 0:
        return Match(
            torch.full((b, a), -1, dtype=torch.int64, device=device), torch.zeros(b, a, device=device)
        )
    boxes = decode_levels(levels, grid, reg_max)
    pred = yolo_box_parts(*boxes.unbind(1))  # the BoxParts (B, A) of every anchor
    step = max(1, CHUNK_PAIRS // max(a, 1))
    kwargs = {"reg_max": reg_max, "iou_factor": iou_factor, "cls_factor": cls_factor, "assigner": assigner}
    inside: Tensor | None
    if g <= step:
        iou, score, inside = _scores(levels, grid, pred, gts, slice(0, g), **kwargs)  # type: ignore[arg-type]
    else:
        iou = torch.empty(g, a, device=device)
        score = torch.empty(g, a, device=device)
        inside = torch.empty(g, a, dtype=torch.bool, device=device) if assigner == "upstream" else None
        for start in range(0, g, step):  # chunks of rows bound the CIoU's temporaries
            rows = slice(start, min(g, start + step))
            iou[rows], score[rows], mask = _scores(levels, grid, pred, gts, rows, **kwargs)  # type: ignore[arg-type]
            if inside is not None and mask is not None:
                inside[rows] = mask
    index, ok = _top_k(score if inside is None else score.masked_fill(~inside, 0.0), topk)
    kept = None
    if assigner == "upstream":
        _ensure_one(score, index, ok)
        # scatter_add, not scatter_: a lonely row's index may repeat among its (not kept) entries
        kept = iou.new_zeros(g, a).scatter_add_(1, index, ok.to(iou.dtype)) > 0
    owner = _owners(iou, index, ok, kept, gts, b).to(torch.int64)
    return Match(owner, _soft_scores(iou, score, owner))


def _top_k(score: Tensor, topk: int) -> tuple[Tensor, Tensor]:
    """The ``topk`` largest scores of each row of ``(G, A)`` scores: their anchors ``(G, k)`` and
    whether each is kept (score > 0)."""
    values, index = score.topk(min(topk, score.shape[1]), dim=1)
    return index, values > 0


def _ensure_one(score: Tensor, index: Tensor, ok: Tensor) -> None:
    """Upstream: a row that kept nothing keeps its best anchor over all anchors, if its score is > 0
    (written into entry 0 of ``index`` and ``ok``, in place)."""
    best, at = score.max(dim=1)
    lonely = ~ok.any(1) & (best > 0)
    index[:, 0] = torch.where(lonely, at, index[:, 0])
    ok[:, 0] |= lonely


def _owners(
    iou: Tensor, index: Tensor, ok: Tensor, kept: Tensor | None, gts: GroundTruths, batch: int
) -> Tensor:
    """``(B, A)`` owner row (as float32) of each anchor: its only keeper, or for an anchor kept by several rows the
    row of largest CIoU (over all rows of the image for NetsPresso, ``kept`` None; over the keepers,
    the ``(G, A)`` mask ``kept``, for upstream), the first on ties; ``-1`` for an anchor nobody kept.
    ``index``, ``ok`` ``(G, k)``: the anchors each row kept (where ``ok``)."""
    g, a = iou.shape
    # rows as float32 (exact below 2^24): scatter_reduce on float is far faster than on int64 on CPU;
    # where(mask, row, c) as (row - c) mask + c: exact on these integers, and far faster on CPU than
    # a where broadcasting a column
    row = torch.arange(g, device=iou.device, dtype=iou.dtype)[:, None]
    at = (gts.image[:, None] * a + index).reshape(-1)  # the keepers' (image, anchor), flat
    ok_f = ok.to(iou.dtype)
    count = iou.new_zeros(batch * a).index_add_(0, at, ok_f.reshape(-1)).view(batch, a)
    keeper = ok_f.mul_(row + 1).sub_(1).reshape(-1)
    single = iou.new_full((batch * a,), -1.0).scatter_reduce_(0, at, keeper, "amax").view(batch, a)
    image = gts.image[:, None].expand(g, a)
    value = iou if kept is None else iou.masked_fill(~kept, 0.0)
    best = iou.new_zeros(batch, a).scatter_reduce_(0, image, value, "amax")
    is_best = (value == best.index_select(0, gts.image)).to(iou.dtype)
    first = iou.new_full((batch, a), float(g)).scatter_reduce_(
        0, image, is_best.mul_(row - g).add_(g), "amin"
    )
    return torch.where(count > 1, first, torch.where(count > 0, single, -1.0))


def _soft_scores(iou: Tensor, score: Tensor, owner: Tensor) -> Tensor:
    """``(B, A)`` soft target ``M / (max M + 1e-9) * max CIoU`` of each anchor, maxima over the anchors
    its owner row (``owner``, ``-1`` for background) finally holds: the owners' values are read at
    the ``B x A`` anchors and reduced by row, not over the ``G x A`` matrices."""
    g, a = iou.shape
    fg = owner >= 0
    row = owner.clamp(min=0)
    at = (row * a + torch.arange(a, device=iou.device)).reshape(-1)
    held_iou = torch.where(fg, iou.reshape(-1).take(at).view_as(owner), 0.0)
    held = torch.where(fg, score.reshape(-1).take(at).view_as(owner), 0.0)
    top_iou = iou.new_zeros(g).scatter_reduce_(0, row.reshape(-1), held_iou.reshape(-1), "amax")
    top_score = iou.new_zeros(g).scatter_reduce_(0, row.reshape(-1), held.reshape(-1), "amax")
    return held / (top_score[row] + NORM_EPS) * top_iou[row]
