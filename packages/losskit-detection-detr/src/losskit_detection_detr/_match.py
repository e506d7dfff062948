# SPDX-License-Identifier: Apache-2.0
"""Hungarian matching of DETR-style queries to ground truths, all output sets in one host round trip.

The cost of query ``q`` for ground truth ``j`` of the same image is computed per image, ``(B, Q, N)``
padded to the largest gt count ``N`` of the batch (never the ``(B Q, sum n)`` block matrix whose
off-diagonal blocks are thrown away), for every output set at once. The costs of all sets go to the
host in one transfer with the validity of each gt column appended as an extra row; scipy's
``linear_sum_assignment`` then solves each (set, image) problem on its valid columns.

The solver is a ``torch.library`` custom op, so ``torch.compile`` keeps the criterion in one graph: the
op is opaque to tracing and its output has a static shape ``(S, B, N)`` (the matched query of each gt,
``-1`` where there is none).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from losskit import InputError
from losskit_ops.boxes import box_iou_aligned

__all__ = ["NAME", "giou", "hungarian", "iou_giou", "pair_cost", "set_key", "xyxy"]

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


def giou(b1: Tensor, b2: Tensor) -> Tensor:
    """Generalised IoU of broadcastable ``(..., 4)`` xyxy boxes, without epsilon (as DETR)."""
    return box_iou_aligned(b1, b2, kind="giou", eps=0.0)


def pair_cost(
    logits: Tensor,
    boxes: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    *,
    cost_class: float,
    cost_bbox: float,
    cost_giou: float,
    alpha: float,
    gamma: float,
    eps: float,
    use_focal_loss: bool,
) -> Tensor:
    """Matching cost ``(K, Q, N)`` of queries against the padded gts of their image.

    Args:
        logits: ``(K, Q, C)`` class logits (K = sets x images), float32 or float64.
        boxes: ``(K, Q, 4)`` predicted ``(cx, cy, w, h)``, normalised.
        gt_boxes: ``(K, N, 4)`` gt ``(cx, cy, w, h)``, normalised; padding holds any valid box.
        gt_labels: ``(K, N)`` int64 classes in ``[0, C)`` (padding: any valid class).

    Returns:
        ``cost_bbox * L1 + cost_class * class cost + cost_giou * (-GIoU)``, where the class cost is
        ``alpha (1-p)^gamma (-log(p + eps)) - (1-alpha) p^gamma (-log(1-p + eps))`` with ``p`` the sigmoid
        of gt j's logit (``use_focal_loss``), else ``-softmax(logits)[gt j's class]``.
    """
    k, q, _ = logits.shape
    n = gt_labels.shape[1]
    index = gt_labels[:, None, :].expand(k, q, n)
    if use_focal_loss:
        p = logits.sigmoid().gather(2, index)
        pos = alpha * (1.0 - p).pow(gamma) * (-(p + eps).log())
        neg = (1.0 - alpha) * p.pow(gamma) * (-(1.0 - p + eps).log())
        cls = pos - neg
    else:
        cls = -logits.softmax(-1).gather(2, index)
    l1 = (boxes[:, :, None, :] - gt_boxes[:, None, :, :]).abs().sum(-1)
    overlap = giou(xyxy(boxes)[:, :, None, :], xyxy(gt_boxes)[:, None, :, :])
    return cost_bbox * l1 + cost_class * cls - cost_giou * overlap


def _solve(packed: np.ndarray) -> np.ndarray:
    """Assignments ``(S, B, N)`` from costs ``(S, B, Q + 1, N)`` whose last row flags valid columns."""
    s_count, b_count, rows, n = packed.shape
    q = rows - 1
    result = np.full((s_count, b_count, n), -1, dtype=np.int64)
    for b in range(b_count):
        cols = np.flatnonzero(packed[0, b, q] > 0.5)
        if cols.size == 0 or q == 0:
            continue
        for s in range(s_count):
            cost = packed[s, b, :q][:, cols]
            if not np.isfinite(cost).all():
                raise InputError(
                    NAME,
                    set_key(s),
                    f"image {b}: the matching cost contains non-finite values (nan or inf); the "
                    "predicted boxes or logits of this output set are not finite",
                )
            query, col = linear_sum_assignment(cost)
            result[s, b, cols[col]] = query
    return result


def _hungarian(packed: Tensor) -> Tensor:
    host = packed.detach().to("cpu", torch.float64 if packed.dtype == torch.float64 else torch.float32)
    result = torch.from_numpy(_solve(host.numpy()))
    if packed.device.type == "cuda":  # pinned: the copy back does not block the host again
        return result.pin_memory().to(packed.device, non_blocking=True)
    return result.to(packed.device)


@torch.library.custom_op("losskit_detection_detr::hungarian", mutates_args=())
def _hungarian_op(packed: Tensor) -> Tensor:
    return _hungarian(packed)


@_hungarian_op.register_fake
def _(packed: Tensor) -> Tensor:
    s, b, _, n = packed.shape
    return packed.new_empty((s, b, n), dtype=torch.int64)


def hungarian(packed: Tensor) -> Tensor:
    """Matched query of each gt ``(S, B, N)`` int64 (``-1``: unmatched or invalid gt).

    ``packed`` is ``(S, B, Q + 1, N)``: the costs of S output sets, and in row ``Q`` a 1 for each valid
    gt column (0 for padding and for gts left out of matching). It is read back to the host once.
    Eager code calls the solver directly; while ``torch.compile`` traces, it goes through the custom op
    ``losskit_detection_detr::hungarian`` (opaque to tracing, static output shape), whose dispatch would
    only add overhead eagerly.
    """
    if torch.compiler.is_compiling():
        return _hungarian_op(packed)
    return _hungarian(packed)
