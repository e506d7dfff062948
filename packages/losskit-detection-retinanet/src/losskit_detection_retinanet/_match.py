# SPDX-License-Identifier: Apache-2.0
"""Batched anchor matching for RetinaNet (private).

Ground truths of the B images are padded to ``G = max n_i`` boxes with a ``(B, G)`` validity mask, and the
IoU of every (image, gt, anchor) triple is computed at once by :func:`batched_box_iou`. That function is
our own rather than ``torchvision.ops.box_iou`` (which also accepts leading batch dimensions since
torchvision 0.24) for speed and memory only: box_iou broadcasts ``(..., G, 1, 2)`` corner pairs against
``(..., 1, A, 2)``, materialising three ``(B, G, A, 2)`` temporaries in a layout that vectorises poorly;
computing x and y separately on ``(B, G, A)`` with in-place ops does the same arithmetic, element by
element and in the same order, in about 2/3 of the time and half the memory. The values are therefore
bit-identical to box_iou's (a test checks it), and so are the matches.

The rules are those of ``torchvision.models.detection._utils.Matcher``, applied to all images at once:

1. each anchor takes the gt of highest IoU (the first one on ties);
2. best IoU ``< bg_iou_thresh``: background (-1); ``in [bg_iou_thresh, fg_iou_thresh)``: ignored (-2);
3. with ``allow_low_quality_matches``: for every gt, the anchors whose IoU with it equals that gt's
   highest IoU (ties included, even when that IoU is below the thresholds, even 0) get back their
   best gt from step 1.

Padded gts get IoU -1 so that they never win step 1 and are masked out of step 3. An image without any
gt has every anchor background.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.models.detection._utils import encode_boxes

__all__ = ["BACKGROUND", "IGNORED", "batched_box_iou", "decode", "encode", "match_anchors", "pad_gt"]

#: Matched index of a background anchor.
BACKGROUND = -1
#: Matched index of an anchor whose best IoU lies between the thresholds (no loss at all).
IGNORED = -2


def pad_gt(
    boxes: list[Tensor], labels: list[Tensor], *, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """Pad per-image ground truths to a batch.

    Args:
        boxes: B tensors ``(n_i, 4)`` xyxy.
        labels: B integer tensors ``(n_i,)``.
        dtype: floating dtype of the padded boxes.
        device: where the padded tensors live.

    Returns:
        ``(B, G, 4)`` boxes (zeros in padding), ``(B, G)`` int64 labels (0 in padding) and the ``(B, G)``
        bool mask of real boxes, ``G = max n_i`` (0 when every image is empty).
    """
    b = len(boxes)
    g = max((int(x.shape[0]) for x in boxes), default=0)
    if g == 0:
        return (
            torch.zeros(b, 0, 4, dtype=dtype, device=device),
            torch.zeros(b, 0, dtype=torch.int64, device=device),
            torch.zeros(b, 0, dtype=torch.bool, device=device),
        )
    # built on the device from the shapes (no host-to-device copy, which would synchronise)
    valid = torch.nn.utils.rnn.pad_sequence(
        [torch.ones(x.shape[0], dtype=torch.bool, device=device) for x in boxes], batch_first=True
    )
    padded_boxes = torch.nn.utils.rnn.pad_sequence(
        [x.to(device=device, dtype=dtype) for x in boxes], batch_first=True
    )
    padded_labels = torch.nn.utils.rnn.pad_sequence(
        [x.to(device=device, dtype=torch.int64) for x in labels], batch_first=True
    )
    return padded_boxes, padded_labels, valid


def encode(matched: Tensor, anchors: Tensor, weights: tuple[float, float, float, float]) -> Tensor:
    """Box-coder targets ``(N, 4)`` of ``matched`` gt boxes against ``anchors`` (both ``(N, 4)`` xyxy).

    torchvision's ``encode_boxes`` (what ``BoxCoder.encode_single`` calls), given the weights as a CPU
    tensor: ``BoxCoder`` builds it on the boxes' device, a host-to-device copy that synchronises.
    """
    return encode_boxes(matched, anchors, torch.tensor(weights, dtype=matched.dtype))


def decode(
    deltas: Tensor, anchors: Tensor, weights: tuple[float, float, float, float], clip: float
) -> Tensor:
    """Boxes ``(N, 4)`` xyxy from ``deltas`` ``(N, 4)`` relative to ``anchors`` ``(N, 4)``.

    The arithmetic of torchvision's ``BoxCoder.decode_single``, in the same order (so the same values
    bit for bit, a test checks it), without its ``torch.tensor(0.5, device=...)``, a synchronising
    host-to-device copy on accelerators.
    """
    anchors = anchors.to(deltas.dtype)
    widths = anchors[:, 2] - anchors[:, 0]
    heights = anchors[:, 3] - anchors[:, 1]
    ctr_x = anchors[:, 0] + 0.5 * widths
    ctr_y = anchors[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx = deltas[:, 0] / wx
    dy = deltas[:, 1] / wy
    dw = torch.clamp(deltas[:, 2] / ww, max=clip)
    dh = torch.clamp(deltas[:, 3] / wh, max=clip)
    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    half_w = 0.5 * (torch.exp(dw) * widths)
    half_h = 0.5 * (torch.exp(dh) * heights)
    return torch.stack(
        (pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h), dim=1
    )


def batched_box_iou(boxes: Tensor, anchors: Tensor) -> Tensor:
    """IoU of ``(B, G, 4)`` xyxy boxes against ``(A, 4)`` or ``(B, A, 4)`` xyxy anchors: ``(B, G, A)``.

    Same arithmetic as ``torchvision.ops.box_iou`` (areas ``(x2 - x1) * (y2 - y1)``, intersection
    ``clamp(min(x2) - max(x1), 0) * clamp(min(y2) - max(y1), 0)``, ``inter / (area1 + area2 - inter)``),
    hence the same values bit for bit; no autograd (used under ``no_grad``).
    """
    gx1, gy1, gx2, gy2 = (t[:, :, None] for t in boxes.unbind(-1))  # (B, G, 1)
    if anchors.dim() == 2:
        ax1, ay1, ax2, ay2 = (t[None, None, :] for t in anchors.unbind(-1))  # (1, 1, A)
    else:
        ax1, ay1, ax2, ay2 = (t[:, None, :] for t in anchors.unbind(-1))  # (B, 1, A)
    area_g = (gx2 - gx1) * (gy2 - gy1)
    area_a = (ax2 - ax1) * (ay2 - ay1)
    inter = torch.minimum(gx2, ax2).sub_(torch.maximum(gx1, ax1)).clamp_(min=0)
    h = torch.minimum(gy2, ay2).sub_(torch.maximum(gy1, ay1)).clamp_(min=0)
    inter.mul_(h)
    del h
    union = (area_g + area_a).sub_(inter)
    return inter.div_(union)


@torch.no_grad()
def match_anchors(
    gt_boxes: Tensor,
    gt_valid: Tensor,
    anchors: Tensor,
    *,
    fg_iou_thresh: float,
    bg_iou_thresh: float,
    allow_low_quality_matches: bool,
) -> Tensor:
    """Match anchors to padded ground truths, as torchvision's ``Matcher`` does image by image.

    Args:
        gt_boxes: ``(B, G, 4)`` xyxy ground truths, padded.
        gt_valid: ``(B, G)`` bool, True for real boxes.
        anchors: ``(A, 4)`` xyxy anchors shared by the images, or ``(B, A, 4)`` per image.
        fg_iou_thresh: best IoU at or above it: foreground.
        bg_iou_thresh: best IoU below it: background; in between: ignored.
        allow_low_quality_matches: each gt's highest-IoU anchors (ties included) are foreground.

    Returns:
        ``(B, A)`` int64: the matched gt index in ``[0, n_i)``, ``BACKGROUND`` (-1) or ``IGNORED`` (-2).
    """
    b, g = gt_valid.shape
    a = anchors.shape[-2]
    if g == 0 or a == 0:
        return torch.full((b, a), BACKGROUND, dtype=torch.int64, device=anchors.device)
    iou = batched_box_iou(gt_boxes, anchors)  # (B, G, A)
    iou.masked_fill_(~gt_valid[:, :, None], -1.0)
    best_iou, best_gt = iou.max(dim=1)  # (B, A); first maximum on ties, as Matcher's max(dim=0)
    background = torch.full_like(best_gt, BACKGROUND)
    ignored = torch.full_like(best_gt, IGNORED)
    matches = torch.where(
        best_iou < bg_iou_thresh,
        background,
        torch.where(best_iou < fg_iou_thresh, ignored, best_gt),
    )
    if allow_low_quality_matches:
        highest = iou.amax(dim=2, keepdim=True)  # (B, G, 1)
        highest.masked_fill_(~gt_valid[:, :, None], math.inf)  # padding: never equal to an IoU
        is_best = (iou == highest).any(dim=1)  # (B, A): the best anchor of some gt (ties included)
        matches = torch.where(is_best, best_gt, matches)
    return matches
