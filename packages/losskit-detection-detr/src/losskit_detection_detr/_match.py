# SPDX-License-Identifier: Apache-2.0
"""Hungarian matching of DETR-style queries to ground truths, all output sets in one host round trip.

The cost of query ``q`` for ground truth ``j`` of the same image is computed per image, for every
output set at once: one row per gt of the batch, against the queries of that gt's own image (never
the ``(B Q, sum n)`` block matrix whose off-diagonal blocks are thrown away, and no padding to the
largest image either). The costs of all sets go to the host in one transfer, with
the validity of each gt appended as an extra column; scipy's ``linear_sum_assignment`` then solves
each (set, image) problem on its valid rows.

The solver is a ``torch.library`` custom op, so ``torch.compile`` keeps the criterion in one graph: the
op is opaque to tracing and its output has a static shape ``(S, G)`` (the matched query of each of the
G gts, ``-1`` where there is none).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from losskit import InputError
from losskit_ops.boxes import box_iou_aligned

__all__ = ["NAME", "hungarian", "iou_giou", "pair_cost", "set_key", "xyxy"]

NAME = "detr_loss"


def set_key(index: int) -> str:
    """The ``out`` key of output set ``index``: 0 is the final layer, then the aux entries."""
    return "out['pred']" if index == 0 else f"out['aux_pred'][{index - 1}]"


def xyxy(boxes: Tensor) -> Tensor:
    """``(..., 4)`` ``(cx, cy, w, h)`` boxes as ``(x1, y1, x2, y2)``."""
    half = boxes[..., 2:] / 2
    return torch.cat((boxes[..., :2] - half, boxes[..., :2] + half), dim=-1)


def iou_giou(b1: Tensor, b2: Tensor) -> tuple[Tensor, Tensor]:
    """IoU and generalised IoU of broadcastable ``(..., 4)`` xyxy boxes, without epsilon (as DETR).

    Reference: Rezatofighi et al., "Generalized Intersection over Union", CVPR 2019.
    """
    return box_iou_aligned(b1, b2, kind="iou", eps=0.0), box_iou_aligned(b1, b2, kind="giou", eps=0.0)


def _pow(x: Tensor, gamma: float) -> Tensor:
    """``x ** gamma``; a multiplication for gamma = 2 (torch's CPU ``pow`` is not vectorised)."""
    return torch.square(x) if gamma == 2.0 else x.pow(gamma)


def pair_cost(
    logits: Tensor,
    boxes: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_image: Tensor,
    *,
    cost_class: float,
    cost_bbox: float,
    cost_giou: float,
    alpha: float,
    gamma: float,
    eps: float,
    use_focal_loss: bool,
) -> Tensor:
    """Matching cost ``(S, G, Q)`` of each gt against the queries of its own image, for S output sets.

    The rows are the G gts of the batch (no padding); row j holds the cost of every query of image
    ``gt_image[j]`` for gt j, so no cost between an image's queries and another image's gts is formed.

    Args:
        logits: ``(S, B, Q, C)`` class logits, float32 or float64.
        boxes: ``(S, B, Q, 4)`` predicted ``(cx, cy, w, h)``, normalised.
        gt_boxes: ``(G, 4)`` gt ``(cx, cy, w, h)``, normalised (any valid box where a gt is invalid).
        gt_labels: ``(G,)`` int64 classes in ``[0, C)``.
        gt_image: ``(G,)`` int64 image of each gt.

    Returns:
        ``cost_bbox * L1 + cost_class * class cost + cost_giou * (-GIoU)``, where the class cost is
        ``alpha (1-p)^gamma (-log(p + eps)) - (1-alpha) p^gamma (-log(1-p + eps))`` with ``p`` the sigmoid
        of gt j's logit (``use_focal_loss``), else ``-softmax(logits)[gt j's class]``.
    """
    s, _, q, c = logits.shape
    if use_focal_loss:
        at = (gt_image * (q * c) + gt_labels)[:, None] + torch.arange(q, device=logits.device) * c
        p = logits.reshape(s, -1).index_select(1, at.reshape(-1)).view(s, -1, q).sigmoid()
        one_minus = 1.0 - p
        pos = torch.log(p + eps).mul_(_pow(one_minus, gamma)).mul_(-alpha)
        neg = torch.log(one_minus.add_(eps)).mul_(_pow(p, gamma)).mul_(alpha - 1.0)
        cost = pos.sub_(neg).mul_(cost_class)
    else:
        prob = logits.softmax(-1)[:, gt_image]
        cost = prob.gather(3, gt_labels[None, :, None, None].expand(s, -1, q, 1))[..., 0].mul_(-cost_class)
    # L1 and GIoU inline, coordinates first so that each is a contiguous (S, G, Q) plane (cx, cy, w, h,
    # x1, y1, x2, y2): about 4x faster on CPU than broadcasting (..., 4) boxes through box_iou_aligned
    half = boxes[..., 2:] / 2
    coords = torch.cat((boxes, boxes[..., :2] - half, boxes[..., :2] + half), dim=-1)
    pred = coords.permute(3, 0, 1, 2).contiguous().index_select(2, gt_image)  # (8, S, G, Q)
    g_half = gt_boxes[:, 2:] / 2
    g = torch.cat((gt_boxes, gt_boxes[:, :2] - g_half, gt_boxes[:, :2] + g_half), dim=-1).T[:, None, :, None]
    l1 = (pred[0] - g[0]).abs_()
    for i in range(1, 4):
        l1 += (pred[i] - g[i]).abs_()
    cost.add_(l1.mul_(cost_bbox))
    iw = torch.minimum(pred[6], g[6]).sub_(torch.maximum(pred[4], g[4])).clamp_(min=0)
    ih = torch.minimum(pred[7], g[7]).sub_(torch.maximum(pred[5], g[5])).clamp_(min=0)
    inter = iw.mul_(ih)
    union = (pred[2] * pred[3]).add_(g[2] * g[3]).sub_(inter)
    hw = torch.maximum(pred[6], g[6]).sub_(torch.minimum(pred[4], g[4]))
    hh = torch.maximum(pred[7], g[7]).sub_(torch.minimum(pred[5], g[5]))
    hull = hw.mul_(hh)
    # -GIoU = (hull - union) / hull - inter / union
    neg_giou = (hull - union).div_(hull).sub_(inter.div_(union))
    return cost.add_(neg_giou.mul_(cost_giou))


def _solve(packed: np.ndarray, counts: list[int]) -> np.ndarray:
    """Matched query of each gt row ``(S, G)`` from costs ``(S, G, Q + 1)``; the last column flags
    valid rows, ``counts`` gives the rows of each image in order."""
    s_count, g, cols = packed.shape
    q = cols - 1
    result = np.full((s_count, g), -1, dtype=np.int64)
    start = 0
    for b, n in enumerate(counts):
        rows = start + np.flatnonzero(packed[0, start : start + n, q] > 0.5)
        start += n
        if rows.size == 0 or q == 0:
            continue
        for s in range(s_count):
            cost = packed[s, rows, :q]
            if not np.isfinite(cost).all():
                raise InputError(
                    NAME,
                    set_key(s),
                    f"image {b}: the matching cost contains non-finite values (nan or inf); the "
                    "predicted boxes or logits of this output set are not finite",
                )
            gt, query = linear_sum_assignment(cost)
            result[s, rows[gt]] = query
    return result


def _hungarian(packed: Tensor, counts: list[int]) -> Tensor:
    host = packed.detach().to("cpu", torch.float64 if packed.dtype == torch.float64 else torch.float32)
    result = torch.from_numpy(_solve(host.numpy(), counts))
    if packed.device.type == "cuda":  # pinned: the copy back does not block the host again
        return result.pin_memory().to(packed.device, non_blocking=True)
    return result.to(packed.device)


@torch.library.custom_op("losskit_detection_detr::hungarian", mutates_args=())
def _hungarian_op(packed: Tensor, counts: list[int]) -> Tensor:
    return _hungarian(packed, counts)


@_hungarian_op.register_fake
def _(packed: Tensor, counts: list[int]) -> Tensor:
    s, g, _ = packed.shape
    return packed.new_empty((s, g), dtype=torch.int64)


def hungarian(packed: Tensor, counts: list[int]) -> Tensor:
    """Matched query of each gt ``(S, G)`` int64 (``-1``: unmatched or invalid gt).

    ``packed`` is ``(S, G, Q + 1)``: the costs of S output sets for the G gts of the batch (image by
    image, ``counts[i]`` rows for image i), and in column ``Q`` a 1 for each gt that takes part in
    matching. It is read back to the host once. Eager code calls the solver directly; while
    ``torch.compile`` traces, it goes through the custom op ``losskit_detection_detr::hungarian``
    (opaque to tracing, static output shape), whose dispatch would only add overhead eagerly.
    """
    if torch.compiler.is_compiling():
        return _hungarian_op(packed, counts)
    return _hungarian(packed, counts)
