# SPDX-License-Identifier: Apache-2.0
"""Batched anchor matching for RetinaNet (private).

Ground truths of the B images are padded to ``G = max n_i`` boxes with a ``(B, G)`` validity mask, and the
IoU of (image, gt, anchor) triples is computed by ``losskit_ops.batched_box_iou`` (bit-identical to
``torchvision.ops.box_iou``, faster and smaller; see its docstring), so the matches are torchvision's.

The rules are those of ``torchvision.models.detection._utils.Matcher``, applied to all images at once:

1. each anchor takes the gt of highest IoU (the first one on ties);
2. best IoU ``< bg_iou_thresh``: background (-1); ``in [bg_iou_thresh, fg_iou_thresh)``: ignored (-2);
3. with ``allow_low_quality_matches``: for every gt, the anchors whose IoU with it equals that gt's
   highest IoU (ties included, even when that IoU is below the thresholds, even 0) get back their
   best gt from step 1.

Padded and invalid gts (see :func:`prepare_gt`) get IoU -1 so that they never win step 1 and are masked
out of step 3. An image without any valid gt has every anchor background; so has every invalid anchor
(zero or negative width or height, or not finite), which takes part in matching as an all-zero box.

**Blocks.** When the padded ``B x G x A`` IoU is small and padding wastes little (gt counts alike), one
batched block computes it. Otherwise (skewed or crowded batches) each image is matched on its own, over
chunks of at most ``max_elements // A`` gts: step 1 keeps a running maximum (a later chunk wins only with
a strictly higher IoU, so the first gt still wins ties) and step 3 needs only each gt's own row, so the
matches are identical while the memory is bounded by ``max_elements`` per intermediate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from losskit_ops.boxes import batched_box_iou

__all__ = [
    "BACKGROUND",
    "IGNORED",
    "MAX_BLOCK_ELEMENTS",
    "MAX_BLOCK_ELEMENTS_CPU",
    "PaddedGt",
    "match_anchors",
    "pad_gt",
    "prepare_gt",
    "safe_anchors",
]

#: Matched index of a background anchor.
BACKGROUND = -1
#: Matched index of an anchor whose best IoU lies between the thresholds (no loss at all).
IGNORED = -2
#: Largest IoU block (images x gts x anchors) computed at once on an accelerator: 64 MiB per float32
#: intermediate, few kernel launches.
MAX_BLOCK_ELEMENTS = 1 << 24
#: The same on the CPU: 4 MiB blocks stay in the cache across the dozen passes over each block
#: (about twice as fast as 64 MiB blocks at the benchmark sizes).
MAX_BLOCK_ELEMENTS_CPU = 1 << 20


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


class PaddedGt(NamedTuple):
    """Ground truths of a batch, padded, with what matching may use.

    Attributes:
        boxes: ``(B, G, 4)`` xyxy, zeros in padding.
        labels: ``(B, G)`` int64, 0 in padding.
        valid: ``(B, G)`` bool: a real gt with finite coordinates, positive width and height and a label
            in ``[0, C)``; matching sees only these.
        num_invalid: int64 scalar: real gts left out (degenerate, inverted or non-finite box, or label
            out of range).
        counts: ``n_i``, the real gts of each image (host integers, from the shapes).
    """

    boxes: Tensor
    labels: Tensor
    valid: Tensor
    num_invalid: Tensor
    counts: tuple[int, ...]


def prepare_gt(
    boxes: Sequence[Tensor],
    labels: Sequence[Tensor],
    *,
    num_classes: int,
    dtype: torch.dtype,
    device: torch.device,
) -> PaddedGt:
    """Pad the ground truths (:func:`pad_gt`) and mark those matching may use (no host sync)."""
    boxes_p, labels_p, real = pad_gt(list(boxes), list(labels), dtype=dtype, device=device)
    ok = (
        (boxes_p[..., 2] > boxes_p[..., 0])
        & (boxes_p[..., 3] > boxes_p[..., 1])
        & torch.isfinite(boxes_p).all(dim=-1)
        & (labels_p >= 0)
        & (labels_p < num_classes)
    )
    valid = real & ok
    num_invalid = (real & ~ok).sum()
    return PaddedGt(boxes_p, labels_p, valid, num_invalid, tuple(int(x.shape[0]) for x in boxes))


def safe_anchors(anchors: Tensor) -> tuple[Tensor, Tensor]:
    """The anchors with every invalid one (zero or negative width or height, or not finite) replaced by
    the all-zero box, and the ``(..., A)`` bool mask of valid anchors. Valid anchors are unchanged."""
    ok = (
        (anchors[..., 2] > anchors[..., 0])
        & (anchors[..., 3] > anchors[..., 1])
        & torch.isfinite(anchors).all(dim=-1)
    )
    return torch.where(ok[..., None], anchors, 0.0), ok


class _Best(NamedTuple):
    """Per (image, anchor): best IoU, its gt index, and whether it is some gt's highest-IoU anchor."""

    iou: Tensor
    gt: Tensor
    is_best: Tensor | None


def _block(boxes: Tensor, valid: Tensor, anchors: Tensor, low_quality: bool) -> _Best:
    """Steps 1 and the per-gt part of 3 for one block of ``(b, r, 4)`` gts against ``anchors``."""
    iou = batched_box_iou(boxes, anchors)  # (b, r, A)
    iou.masked_fill_(~valid[:, :, None], -1.0)
    best_iou, best_gt = iou.max(dim=1)  # (b, A); first maximum on ties, as Matcher's max(dim=0)
    is_best = None
    if low_quality:
        highest = iou.amax(dim=2, keepdim=True)  # (b, r, 1)
        highest.masked_fill_(~valid[:, :, None], math.inf)  # padding: never equal to an IoU
        is_best = (iou == highest).any(dim=1)  # (b, A): the best anchor of some gt (ties included)
    return _Best(best_iou, best_gt, is_best)


def _merge(first: _Best, later: _Best, offset: int) -> _Best:
    """Fold a later block of gts (rows from ``offset``) into ``first``: it wins only with a higher IoU."""
    better = later.iou > first.iou
    is_best = None
    if first.is_best is not None and later.is_best is not None:
        is_best = first.is_best | later.is_best
    return _Best(
        torch.where(better, later.iou, first.iou),
        torch.where(better, later.gt + offset, first.gt),
        is_best,
    )


def _decide(best: _Best, fg_iou_thresh: float, bg_iou_thresh: float) -> Tensor:
    background = torch.full_like(best.gt, BACKGROUND)
    ignored = torch.full_like(best.gt, IGNORED)
    matches = torch.where(
        best.iou < bg_iou_thresh,
        background,
        torch.where(best.iou < fg_iou_thresh, ignored, best.gt),
    )
    if best.is_best is not None:
        matches = torch.where(best.is_best, best.gt, matches)
    return matches


def _match_image(
    boxes: Tensor, valid: Tensor, anchors: Tensor, n: int, rows: int, low_quality: bool
) -> _Best:
    """One image (``boxes`` ``(1, G, 4)``, its first ``n`` real), gts in chunks of ``rows``."""
    first = min(rows, n)
    best = _block(boxes[:, :first], valid[:, :first], anchors, low_quality)
    for start in range(rows, n, rows):
        stop = min(start + rows, n)
        best = _merge(best, _block(boxes[:, start:stop], valid[:, start:stop], anchors, low_quality), start)
    return best


@torch.no_grad()
def match_anchors(
    gt_boxes: Tensor,
    gt_valid: Tensor,
    anchors: Tensor,
    *,
    fg_iou_thresh: float,
    bg_iou_thresh: float,
    allow_low_quality_matches: bool,
    counts: Sequence[int] | None = None,
    max_elements: int | None = None,
) -> Tensor:
    """Match anchors to padded ground truths, as torchvision's ``Matcher`` does image by image.

    Args:
        gt_boxes: ``(B, G, 4)`` xyxy ground truths, padded.
        gt_valid: ``(B, G)`` bool, True for the gts matching may use.
        anchors: ``(A, 4)`` xyxy anchors shared by the images, or ``(B, A, 4)`` per image.
        fg_iou_thresh: best IoU at or above it: foreground.
        bg_iou_thresh: best IoU below it: background; in between: ignored.
        allow_low_quality_matches: each gt's highest-IoU anchors (ties included) are foreground.
        counts: the real gts of each image (host integers; default ``G`` each): rows past them are padding.
        max_elements: the largest IoU block computed at once (see the module doc; default
            ``MAX_BLOCK_ELEMENTS_CPU`` on the CPU, else ``MAX_BLOCK_ELEMENTS``); the result does not
            depend on it.

    Returns:
        ``(B, A)`` int64: the matched gt index in ``[0, n_i)``, ``BACKGROUND`` (-1) or ``IGNORED`` (-2).
    """
    b, g = gt_valid.shape
    a = anchors.shape[-2]
    if g == 0 or a == 0:
        return torch.full((b, a), BACKGROUND, dtype=torch.int64, device=anchors.device)
    counts = tuple(counts) if counts is not None else (g,) * b
    if max_elements is None:
        max_elements = MAX_BLOCK_ELEMENTS_CPU if anchors.is_cpu else MAX_BLOCK_ELEMENTS
    anchors, anchor_ok = safe_anchors(anchors)
    if b * g * a <= max_elements and 4 * b * g <= 5 * sum(counts):  # small, little padding: one block
        best = _block(gt_boxes, gt_valid, anchors, allow_low_quality_matches)
        matches = _decide(best, fg_iou_thresh, bg_iou_thresh)
    else:
        rows = max(1, max_elements // a)
        per_image = []
        for i, n in enumerate(counts):
            if n == 0:
                per_image.append(torch.full((1, a), BACKGROUND, dtype=torch.int64, device=anchors.device))
                continue
            anc = anchors if anchors.dim() == 2 else anchors[i : i + 1]
            best = _match_image(
                gt_boxes[i : i + 1], gt_valid[i : i + 1], anc, n, rows, allow_low_quality_matches
            )
            per_image.append(_decide(best, fg_iou_thresh, bg_iou_thresh))
        matches = torch.cat(per_image)
    return torch.where(anchor_ok, matches, BACKGROUND)
