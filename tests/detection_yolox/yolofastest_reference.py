# SPDX-License-Identifier: Apache-2.0
"""A per-image reference of the YOLO-Fastest loss in the structure of NetsPresso Trainer's
``YOLOFastestLoss``: a subclass of the YOLOX reference (``yolox_reference.py``: a Python loop over
images, the ``(num_gt, candidates, C)`` class cost, a loop over ground truths, ``.item()``-style host
reads) that only changes how the head is flattened and decoded. Written from the description in
losskit's issue 14 for the parity tests and the benchmark, not from NetsPresso's text.

The decode is written in NetsPresso's ``tanh`` form, ``w = 2 (tanh(tw / 2 - atanh(1/2)) + 1) anchor_w``,
so the tests also check that it equals losskit's ``4 sigmoid(tw - ln 3) anchor_w`` (in float64, see
:func:`_size`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from yolox_reference import ReferenceYOLOX


def _size(t: Tensor, anchor: Tensor) -> Tensor:
    """``2 (tanh(t / 2 - atanh(1/2)) + 1) anchor`` (NetsPresso's form), evaluated in float64: in float32,
    ``tanh + 1`` cancels for boxes far below the anchor's size (1e-4 relative at 1/100 of it)."""
    return (2.0 * (torch.tanh(t.double() / 2 - math.atanh(0.5)) + 1.0) * anchor.double()).to(t.dtype)


class ReferenceYOLOFastest(ReferenceYOLOX):
    """Per-image YOLO-Fastest loss; ``__call__(pred, gts, img_size)`` returns ``(terms, assignments)``
    with ``terms`` ``iou``, ``obj``, ``cls`` (and the YOLOX reference's ``l1``, always 0)."""

    def __init__(self, num_classes: int, anchors: Sequence[Sequence[float]], **kw: Any) -> None:
        kw.setdefault("iou_loss", "giou")
        super().__init__(num_classes, use_l1=False, **kw)
        self.anchors = [torch.tensor(a, dtype=torch.float32).view(-1, 2) for a in anchors]

    def _flatten(self, pred: list[Tensor], img_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        outputs, raws, xs, ys, strides = [], [], [], [], []
        for level, anchors in zip(pred, self.anchors):
            b, na, ch, h, w = level.shape
            stride = img_size / w
            out = level.permute(0, 1, 3, 4, 2)  # (B, nA, H, W, 5 + C)
            gy, gx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            grid = torch.stack((gx, gy), 2).to(level.dtype).expand(na, h, w, 2)
            size = anchors.to(level.dtype).view(na, 1, 1, 2)
            decoded = torch.cat(
                [
                    (out[..., :2].sigmoid() + grid) * stride,
                    _size(out[..., 2:4], size),
                    out[..., 4:],
                ],
                dim=-1,
            )
            outputs.append(decoded.reshape(b, na * h * w, ch))
            raws.append(out[..., :4].reshape(b, na * h * w, 4))
            xs.append(grid[..., 0].reshape(1, -1))
            ys.append(grid[..., 1].reshape(1, -1))
            strides.append(torch.full((1, na * h * w), stride, dtype=level.dtype))
        return (
            torch.cat(outputs, 1),
            torch.cat(raws, 1),
            torch.cat(xs, 1),
            torch.cat(ys, 1),
            torch.cat(strides, 1),
        )
