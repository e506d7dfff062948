# SPDX-License-Identifier: Apache-2.0
"""Batched anchor matching for RetinaNet (private).

Ground truths of the B images are padded to ``G = max n_i`` boxes with a ``(B, G)`` validity mask, and the
IoU of every (image, gt, anchor) triple is computed at once by ``losskit_ops.batched_box_iou``
(bit-identical to ``torchvision.ops.box_iou``, faster and smaller; see its docstring), so the matches
are torchvision's.

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

from losskit_ops.boxes import batched_box_iou

__all__ = ["BACKGROUND", "IGNORED", "match_anchors", "pad_gt"]

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
