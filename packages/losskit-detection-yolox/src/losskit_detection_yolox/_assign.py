# SPDX-License-Identifier: Apache-2.0
"""SimOTA label assignment for YOLOX, batched over the images of a batch.

Everything here runs without gradients and in float32. The ground truths of the batch are kept as one
flat list of ``N = sum_b n_b`` rows (each row knows its image), and each image's *candidates* (the
anchors inside the centre prior of at least one of its ground truths) are packed, in anchor order, into
``K`` slots. The pairwise tensors (cost, IoU, prior, matching) are ``(N, K)``: every ground truth
against the candidate slots of its own image. For CPU tensors ``K`` is the largest candidate count of
the batch (read on the host: no device is involved); on accelerators ``K`` is
:func:`candidate_capacity`, a bound known on the host, so nothing is read back and there is no
host-device synchronisation at all. Both give the same assignment.

Memory: about 20 bytes per (ground truth, candidate slot) pair at the peak of the matching, plus
``(B, C, K)`` for the class part of the cost (nothing is ``N x K x C``). ``K`` is at most
``min(A, n_max * sum_l n_l * min(H_l, m) * min(W_l, m))`` with ``m = ceil(2 * center_radius) + 1`` for
``A`` anchors, ``n_l`` anchors per cell of level ``l`` (1 for YOLOX) and ``n_max`` the most boxes in one
image (``min(A, 48 n_max)`` with YOLOX's three levels and radius 1.5).

The anchors may be grid cells (YOLOX) or several sized anchors per cell (YOLO-Fastest): the centre
prior is the cell's in both cases, and the boxes given to :func:`simota_match` are already decoded, so
one assignment serves both losses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from losskit.checks import reads_are_free

__all__ = [
    "AnchorGrid",
    "Assignment",
    "CandidateAssignment",
    "Candidates",
    "GroundTruths",
    "candidate_capacity",
    "find_candidates",
    "simota_match",
]

#: Cost added where an anchor lies outside a ground truth's centre prior (YOLOX's constant).
PRIOR_PENALTY = 1e6
#: Added to the IoU inside the log of the IoU cost.
IOU_COST_EPS = 1e-8


@dataclass(frozen=True)
class AnchorGrid:
    """The anchors of all pyramid levels, flattened level by level, then anchor, row, column.

    An anchor-free level (YOLOX) has one anchor per grid cell; an anchor-based level (YOLO-Fastest) has
    ``n_l`` per cell, each with its own size. The centre prior depends on the cell only, so the anchors
    of a cell are candidates of the same ground truths.

    Attributes:
        x, y: ``(A,)`` float32 cell column / row within its level.
        stride_x, stride_y: ``(A,)`` float32 stride of the cell's level along each axis.
        shapes: ``(H_l, W_l)`` per level.
        strides: ``(stride_y, stride_x)`` per level, as Python floats.
        offsets: index of each level's first anchor.
        per_cell: anchors per cell of each level (1 for anchor-free levels).
        sizes: ``(A, 2)`` float32 anchor ``(w, h)`` in pixels, or None for anchor-free levels.
    """

    x: Tensor
    y: Tensor
    stride_x: Tensor
    stride_y: Tensor
    shapes: tuple[tuple[int, int], ...]
    strides: tuple[tuple[float, float], ...]
    offsets: tuple[int, ...]
    per_cell: tuple[int, ...]
    sizes: Tensor | None = None

    @property
    def num_anchors(self) -> int:
        return int(self.x.shape[0])

    @classmethod
    def build(
        cls,
        shapes: Sequence[tuple[int, int]],
        strides: Sequence[tuple[float, float]],
        device: torch.device,
        anchor_sizes: Sequence[Sequence[tuple[float, float]]] | None = None,
    ) -> AnchorGrid:
        """Anchors for levels of ``shapes`` ``(H_l, W_l)`` with ``strides`` ``(s_y, s_x)``: one per cell,
        or, with ``anchor_sizes``, one per cell and size ``(w, h)`` (pixels) of the level's list."""
        xs, ys, sxs, sys_, whs, offsets, per_cell = [], [], [], [], [], [], []
        start = 0
        for i, ((h, w), (sy, sx)) in enumerate(zip(shapes, strides)):
            n = 1 if anchor_sizes is None else len(anchor_sizes[i])
            offsets.append(start)
            per_cell.append(n)
            row = torch.arange(h, device=device, dtype=torch.float32)
            col = torch.arange(w, device=device, dtype=torch.float32)
            ys.append(row.repeat_interleave(w).repeat(n))
            xs.append(col.repeat(h * n))
            sxs.append(torch.full((n * h * w,), sx, device=device, dtype=torch.float32))
            sys_.append(torch.full((n * h * w,), sy, device=device, dtype=torch.float32))
            if anchor_sizes is not None:
                wh = torch.tensor(anchor_sizes[i], dtype=torch.float32).reshape(n, 2).to(device)
                whs.append(wh.repeat_interleave(h * w, dim=0))
            start += n * h * w
        return cls(
            torch.cat(xs),
            torch.cat(ys),
            torch.cat(sxs),
            torch.cat(sys_),
            tuple((int(h), int(w)) for h, w in shapes),
            tuple((float(sy), float(sx)) for sy, sx in strides),
            tuple(offsets),
            tuple(per_cell),
            torch.cat(whs) if anchor_sizes is not None else None,
        )


@dataclass(frozen=True)
class GroundTruths:
    """The ground truths of a batch as one flat list of rows.

    Attributes:
        boxes: ``(N, 4)`` float32 ``(cx, cy, w, h)`` in input pixels.
        labels: ``(N,)`` int64 classes.
        image: ``(N,)`` int64 image of each row (rows of an image are consecutive, in input order).
        counts: boxes per image (host ints).
        valid: ``(N,)`` bool, or None for all valid. An invalid row (a label outside ``[0, C)``, an
            inverted or non-finite box) stays in place, so that no count is read back, but takes part
            in nothing: it has no candidate and matches no anchor, as if the image did not have it.
            Its box and label must be finite and in range (the caller replaces them).
    """

    boxes: Tensor
    labels: Tensor
    image: Tensor
    counts: tuple[int, ...]
    valid: Tensor | None = None

    @property
    def max_count(self) -> int:
        return max(self.counts, default=0)

    def local_index(self) -> Tensor:
        """``(N,)`` index of each row among its image's ground truths."""
        offsets = torch.zeros(len(self.counts), dtype=torch.int64, device=self.image.device)
        offsets.index_add_(0, self.image, torch.ones_like(self.image))
        offsets = offsets.cumsum(0) - offsets
        return torch.arange(self.image.shape[0], device=self.image.device) - offsets[self.image]


@dataclass(frozen=True)
class Assignment:
    """SimOTA assignment per image and anchor (what :meth:`YOLOXLoss.assign` returns).

    Attributes:
        fg_mask: ``(B, A)`` bool, the foreground anchors.
        matched_gt: ``(B, A)`` int64 index into the image's ground truths, ``-1`` for background.
        matched_iou: ``(B, A)`` float32 IoU of the anchor's decoded box with its ground truth
            (0 for background).
        dynamic_k: ``(B, G)`` int32 number of anchors each ground truth selected (SimOTA's dynamic k;
            0 for padding and for boxes without any candidate anchor). ``G`` is the largest number of
            boxes of an image in the batch.
    """

    fg_mask: Tensor
    matched_gt: Tensor
    matched_iou: Tensor
    dynamic_k: Tensor

    @property
    def num_fg(self) -> Tensor:
        """Foreground anchors per image, ``(B,)`` int64."""
        return self.fg_mask.sum(1)


@dataclass(frozen=True)
class CandidateAssignment:
    """The assignment in the packed candidate layout used by the loss.

    Attributes:
        index: ``(B, K)`` int64 anchor index of each candidate slot (padding slots hold some anchor).
        valid: ``(B, K)`` bool, the slot holds a real candidate.
        fg: ``(B, K)`` bool, the candidate is foreground.
        matched_row: ``(B, K)`` int64 row of the matched ground truth in :class:`GroundTruths`
            (``-1`` where not foreground).
        matched_gt: ``(B, K)`` int64 index of that ground truth within its image (``-1`` likewise).
        matched_iou: ``(B, K)`` float32 IoU with the matched ground truth (0 where not foreground).
        dynamic_k: ``(B, G)`` int32 SimOTA's k per ground truth of each image (0 for padding).
    """

    index: Tensor
    valid: Tensor
    fg: Tensor
    matched_row: Tensor
    matched_gt: Tensor
    matched_iou: Tensor
    dynamic_k: Tensor

    def to_anchors(self, num_anchors: int) -> Assignment:
        """Scatter into the ``(B, A)`` layout of :class:`Assignment`."""
        b = self.index.shape[0]
        device = self.index.device
        # Padding slots are routed to an extra column that is dropped.
        dest = torch.where(self.valid, self.index, torch.full_like(self.index, num_anchors))
        fg = torch.zeros(b, num_anchors + 1, dtype=torch.bool, device=device)
        fg.scatter_(1, dest, self.fg & self.valid)
        gt = torch.full((b, num_anchors + 1), -1, dtype=torch.int64, device=device)
        gt.scatter_(1, dest, torch.where(self.valid, self.matched_gt, -1))
        iou = torch.zeros(b, num_anchors + 1, dtype=torch.float32, device=device)
        iou.scatter_(1, dest, torch.where(self.valid, self.matched_iou, 0.0))
        return Assignment(fg[:, :num_anchors], gt[:, :num_anchors], iou[:, :num_anchors], self.dynamic_k)


def in_center_prior(
    cx: Tensor, cy: Tensor, ax: Tensor, ay: Tensor, sx: Tensor, sy: Tensor, radius: float
) -> Tensor:
    """Whether cell centres ``((ax + 0.5) sx, (ay + 0.5) sy)`` lie strictly within ``radius`` strides
    of the box centres ``(cx, cy)`` on both axes (broadcasting; float32 arithmetic in the reference's
    order of operations, so boundary cells are decided the same way)."""
    xc = (ax + 0.5) * sx
    yc = (ay + 0.5) * sy
    dx = sx * radius
    dy = sy * radius
    return (xc - (cx - dx) > 0.0) & ((cx + dx) - xc > 0.0) & (yc - (cy - dy) > 0.0) & ((cy + dy) - yc > 0.0)


def _candidate_union(gts: GroundTruths, batch_size: int, grid: AnchorGrid, radius: float) -> Tensor:
    """``(B, A)`` bool: anchors inside the centre prior of at least one ground truth of the image.

    Only a window of ``n x n`` cells around each box centre per level is examined (``n`` covers the
    prior with a margin), so the work is ``O(N L n^2)`` instead of ``O(N A)``.
    """
    a = grid.num_anchors
    cx, cy = gts.boxes[:, 0], gts.boxes[:, 1]
    n = math.ceil(2 * radius) + 3
    steps = torch.arange(n, device=cx.device)
    limit = float(2**24)  # keeps float -> int conversion defined for absurd coordinates
    chunks = []
    for (h, w), (sy, sx), off, per_cell in zip(grid.shapes, grid.strides, grid.offsets, grid.per_cell):
        cols = (cx / sx - 0.5 - radius).clamp(-limit, limit).floor().long()[:, None] - 1 + steps  # (N, n)
        rows = (cy / sy - 0.5 - radius).clamp(-limit, limit).floor().long()[:, None] - 1 + steps
        ok = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        cells = (off + rows.clamp(0, h - 1)[:, :, None] * w + cols.clamp(0, w - 1)[:, None, :]).flatten(1)
        inside = in_center_prior(
            cx[:, None],
            cy[:, None],
            grid.x[cells],
            grid.y[cells],
            grid.stride_x[cells],
            grid.stride_y[cells],
            radius,
        )
        keep = ok.flatten(1) & inside
        if gts.valid is not None:
            keep &= gts.valid[:, None]
        if per_cell > 1:  # the cell's other anchors follow at multiples of h * w: the same prior
            shift = torch.arange(per_cell, device=cx.device)[None, :, None] * (h * w)
            cells = (cells[:, None, :] + shift).flatten(1)
            keep = keep[:, None, :].expand(-1, per_cell, -1).flatten(1)
        chunks.append(torch.where(keep, cells, a) + gts.image[:, None] * (a + 1))
    union = torch.zeros(batch_size * (a + 1), dtype=torch.bool, device=cx.device)
    if chunks and gts.image.shape[0]:
        union.scatter_(0, torch.cat(chunks, 1).flatten(), True)
    return union.view(batch_size, a + 1)[:, :a]


def candidate_capacity(max_count: int, grid: AnchorGrid, radius: float) -> int:
    """An upper bound on an image's candidate count known without reading any tensor.

    Along each axis the centre prior ``|(x + 0.5) s - c| < radius * s`` holds for at most
    ``ceil(2 radius)`` cells (one more is allowed for rounding at the open ends), so a ground truth has
    at most ``sum_l n_l * min(W_l, m) * min(H_l, m)`` candidate anchors with ``m = ceil(2 radius) + 1``
    and ``n_l`` anchors per cell.
    """
    m = math.ceil(2 * radius) + 1
    per_gt = sum(n * min(h, m) * min(w, m) for (h, w), n in zip(grid.shapes, grid.per_cell))
    return min(grid.num_anchors, max_count * per_gt)


@dataclass(frozen=True)
class Candidates:
    """Each image's candidate anchors packed in anchor order into ``K`` slots.

    Attributes:
        index: ``(B, K)`` int64 anchor index of each slot; distinct within an image (padding slots
            hold anchors that are not candidates).
        valid: ``(B, K)`` bool, the slot holds a candidate.
        count: ``(B,)`` int64 candidates per image.
    """

    index: Tensor
    valid: Tensor
    count: Tensor


@torch.no_grad()
def find_candidates(
    gts: GroundTruths,
    batch_size: int,
    grid: AnchorGrid,
    *,
    center_radius: float = 1.5,
    capacity: Literal["auto", "exact", "static"] = "auto",
) -> Candidates:
    """The union of the centre priors of each image's ground truths.

    Args:
        gts: the batch's ground truths.
        batch_size: B.
        grid: the anchors.
        center_radius: a cell is a candidate for a ground truth when its centre lies strictly within
            ``center_radius`` strides of the box centre on both axes.
        capacity: how the number ``K`` of slots is chosen: ``exact`` reads the largest candidate count
            of the batch back to the host (a device synchronisation on accelerators), ``static`` uses
            :func:`candidate_capacity` (known on the host, no synchronisation), ``auto`` is ``exact``
            for CPU tensors and ``static`` otherwise (and while ``torch.compile`` traces, where a read
            would break the graph). The assignment does not depend on it.
    """
    union = _candidate_union(gts, batch_size, grid, center_radius)
    count = union.sum(1)
    device = union.device
    if gts.max_count == 0:
        k = 0
    elif capacity == "exact" or (capacity == "auto" and reads_are_free(count)):
        k = int(count.max())  # reads one number back; free on CPU, a synchronisation elsewhere
    else:
        k = candidate_capacity(gts.max_count, grid, center_radius)
    order = torch.sort(union.to(torch.uint8), dim=1, descending=True, stable=True).indices
    index = order[:, :k]
    valid = torch.arange(k, device=device) < count[:, None]
    return Candidates(index, valid, count)


def _pairwise_prior(gt: Tensor, grid: AnchorGrid, index: Tensor, image: Tensor, radius: float) -> Tensor:
    """:func:`in_center_prior` of ground truths ``(N, 4)`` and the candidate cells ``(B, K)`` of their
    image, ``(N, K)`` bool; the same float32 operations, with fewer ``(N, K)`` temporaries."""

    def within(axis: int, coord: Tensor, stride: Tensor) -> Tensor:
        s = stride[index]
        centre = ((coord[index] + 0.5) * s)[image]  # (N, K)
        reach = (s * radius)[image]
        c = gt[:, axis, None]
        inside = centre - (c - reach) > 0.0  # past the near edge
        inside &= reach.add_(c).sub_(centre) > 0.0  # (c + reach) - centre > 0: before the far edge
        return inside

    return within(0, grid.x, grid.stride_x).logical_and_(within(1, grid.y, grid.stride_y))


def _pairwise_iou(gt: Tensor, boxes: Tensor, image: Tensor) -> Tensor:
    """IoU ``(N, K)`` of ground truths ``(N, 4)`` with the candidate boxes ``(B, K, 4)`` of their image
    (``(cx, cy, w, h)``), one axis at a time and mostly in place; clamped to ``[0, 1]``."""

    def overlap(axis: int) -> tuple[Tensor, Tensor]:
        c1, s1 = gt[:, axis, None], gt[:, axis + 2, None]
        c2, s2 = boxes[..., axis], boxes[..., axis + 2]
        lo = torch.maximum(c1 - s1 / 2, (c2 - s2 / 2)[image])
        hi = torch.minimum(c1 + s1 / 2, (c2 + s2 / 2)[image])
        positive = lo < hi
        return hi.sub_(lo), positive

    inter, ex = overlap(0)
    iy, ey = overlap(1)
    # zero where the boxes do not overlap: a fill, not a product with the mask (inf * 0 is NaN when a
    # box lies ~1e19 pixels away)
    inter.mul_(iy).masked_fill_(ex.logical_and_(ey).logical_not_(), 0.0)
    del iy, ey, ex
    area_b = (boxes[..., 2] * boxes[..., 3])[image]
    union = area_b.add_(gt[:, 2, None] * gt[:, 3, None]).sub_(inter)  # area_g + area_b - inter
    return inter.div_(union.clamp_min_(1e-30)).clamp_(0.0, 1.0)


@torch.no_grad()
def simota_match(
    candidates: Candidates,
    boxes: Tensor,
    cls_logits: Tensor,
    obj_logits: Tensor,
    gts: GroundTruths,
    grid: AnchorGrid,
    *,
    center_radius: float = 1.5,
    candidate_topk: int = 10,
    iou_cost_weight: float = 3.0,
) -> CandidateAssignment:
    """SimOTA (YOLOX) on the candidates of a whole batch at once.

    Args:
        candidates: from :func:`find_candidates` (``K`` slots per image).
        boxes: ``(B, K, 4)`` decoded predicted boxes ``(cx, cy, w, h)`` of the candidates, in pixels.
        cls_logits: ``(B, C, K)`` class logits of the candidates.
        obj_logits: ``(B, K)`` objectness logits of the candidates.
        gts: the batch's ground truths (``N`` rows).
        grid: the anchors.
        center_radius: as for :func:`find_candidates`.
        candidate_topk: ``dynamic_k = max(1, int(sum of the top-candidate_topk IoUs))``.
        iou_cost_weight: weight of ``-log(IoU + 1e-8)`` in the cost.

    Returns:
        The assignment in the packed candidate layout (see :class:`CandidateAssignment`).

    The cost of ground truth ``g`` and candidate ``k`` of its image is
    ``sum_c BCE(sqrt(sigmoid(cls_kc) sigmoid(obj_k)), onehot(g)_c) + w * -log(IoU + 1e-8)
    + 1e6 * [k outside g's prior]``. The class sum is evaluated as a per-candidate sum over all classes
    of ``-log(1 - q)`` plus a per-pair correction at the ground truth's class (each log clamped at
    -100 as ``F.binary_cross_entropy`` does), so no ``(N, K, C)`` tensor is built.
    """
    index, valid, count = candidates.index, candidates.valid, candidates.count
    b, k = index.shape
    n = gts.boxes.shape[0]
    device = index.device
    img = gts.image
    dynamic_k_out = torch.zeros(b, gts.max_count, dtype=torch.int32, device=device)
    if k == 0 or n == 0:
        none = torch.full((b, k), -1, dtype=torch.int64, device=device)
        no = torch.zeros(b, k, dtype=torch.bool, device=device)
        return CandidateAssignment(index, valid, no, none, none, no.float(), dynamic_k_out)
    gt = gts.boxes.float()

    # 1. each ground truth against its image's candidate slots: (N, K)
    pair_valid = valid[img]
    if gts.valid is not None:  # an invalid ground truth has no candidate: as if absent
        pair_valid &= gts.valid[:, None]
    prior = _pairwise_prior(gt, grid, index, img, center_radius)
    iou = _pairwise_iou(gt, boxes.float(), img).masked_fill_(~pair_valid, 0.0)

    # 2. class cost without an (N, K, C) tensor: sum_c BCE(q_c, onehot_c) is the sum over all classes
    #    of -log(1 - q_c), corrected at the ground truth's class; logs clamped at -100 as in BCE.
    q = (cls_logits.float().sigmoid() * obj_logits.float().sigmoid()[:, None, :]).sqrt_()  # (B, C, K)
    log_neg = torch.log1p(-q).clamp_(min=-100.0)  # log(1 - q)
    neg_all = -log_neg.sum(1)  # (B, K)
    labels = gts.labels.clamp(0, q.shape[1] - 1)
    log_pos_gt = torch.log(q[img, labels]).clamp_(min=-100.0)  # (N, K)
    cost = log_neg[img, labels]
    del q, log_neg
    # in place, in the order of (cls + w * -log(iou + eps)) + 1e6 * outside, to keep the rounding
    cost.add_(neg_all[img]).sub_(log_pos_gt)
    del log_pos_gt
    cost.add_(torch.log(iou + IOU_COST_EPS).neg_().mul_(iou_cost_weight))
    cost.add_(prior.logical_not_().to(cost.dtype), alpha=PRIOR_PENALTY)
    cost.masked_fill_(~pair_valid, torch.inf)
    del prior

    # 3. dynamic k per ground truth, then its k lowest-cost candidates
    top = min(candidate_topk, k)
    dynamic_k = torch.topk(iou, top, dim=1).values.sum(1).int().clamp_(min=1)
    has_candidates = count[img] > 0
    if gts.valid is not None:
        has_candidates &= gts.valid
    dynamic_k = torch.where(has_candidates, dynamic_k, 0)
    chosen = torch.topk(cost, top, dim=1, largest=False).indices  # (N, top), ascending cost
    matching = torch.zeros(n, k, dtype=torch.bool, device=device)
    matching.scatter_(1, chosen, torch.arange(top, device=device) < dynamic_k[:, None])

    # 4. an anchor chosen by several ground truths goes to the lowest-cost ground truth of its image
    #    (over all of them, as YOLOX does; ties to the first). Reductions over each image's rows.
    rows = torch.arange(n, dtype=torch.int32, device=device)[:, None]
    per_image = img[:, None].expand(n, k)
    n_match = torch.zeros(b, k, dtype=torch.int32, device=device).index_add_(0, img, matching.int())
    lowest = torch.full((b, k), torch.inf, device=device).scatter_reduce_(0, per_image, cost, "amin")
    first = torch.where(cost == lowest[img], rows, n)
    del cost
    none = torch.full((b, k), n, dtype=torch.int32, device=device)
    best = none.scatter_reduce(0, per_image, first, "amin")
    first = torch.where(matching, rows, n)
    only = none.scatter_reduce(0, per_image, first, "amin")
    del first
    fg = n_match > 0
    row = torch.where(n_match > 1, best, only).clamp_(max=n - 1).long()
    matched_iou = iou.gather(0, row)
    local = gts.local_index()
    dynamic_k_out[img, local] = dynamic_k
    return CandidateAssignment(
        index,
        valid,
        fg,
        torch.where(fg, row, -1),
        torch.where(fg, local[row], -1),
        torch.where(fg, matched_iou, 0.0),
        dynamic_k_out,
    )
