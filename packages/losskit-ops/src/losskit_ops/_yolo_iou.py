# SPDX-License-Identifier: Apache-2.0
"""IoU and complete IoU of xyxy boxes with YOLO's ``eps`` convention (``losskit_ops.boxes`` has
torchvision's).

MultimediaTechLab/YOLO (and NetsPresso Trainer, which ports it) add ``eps`` to the union, to the
squared diagonal of the enclosing box, to each height inside the aspect-ratio ``atan`` and to the
denominator of ``alpha``. torchvision's ``complete_box_iou`` adds none inside the ``atan``, so a box
of zero height gives ``0 / 0`` there; YOLO's convention gives 0. ``alpha`` is computed without
gradient, as in the CIoU paper and both implementations.

Reference: Zheng et al., "Distance-IoU Loss", AAAI 2020, arXiv:1911.08287.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = ["YoloBoxParts", "yolo_box_iou", "yolo_box_parts", "yolo_iou_of_parts", "yolo_pairwise_ciou_"]

YoloIoUKind = Literal["iou", "ciou"]
#: YOLO's constant.
YOLO_IOU_EPS = 1e-7
_V_SCALE = 4 / (math.pi**2)


class YoloBoxParts(NamedTuple):
    """Per-box quantities of xyxy boxes that the pairwise (C)IoU needs, computed once per box."""

    x1: Tensor
    y1: Tensor
    x2: Tensor
    y2: Tensor
    area: Tensor
    cx: Tensor
    cy: Tensor
    angle: Tensor  # atan(w / (h + eps))


def yolo_box_parts(
    x1: Tensor, y1: Tensor, x2: Tensor, y2: Tensor, *, eps: float = YOLO_IOU_EPS
) -> YoloBoxParts:
    """The :class:`YoloBoxParts` of boxes given by their four coordinate tensors (any equal shapes)."""
    w, h = x2 - x1, y2 - y1
    return YoloBoxParts(x1, y1, x2, y2, w * h, (x2 + x1) / 2, (y2 + y1) / 2, torch.atan(w / (h + eps)))


def yolo_iou_of_parts(
    a: YoloBoxParts, b: YoloBoxParts, *, kind: YoloIoUKind = "ciou", eps: float = YOLO_IOU_EPS
) -> Tensor:
    """IoU or CIoU of two broadcastable sets of boxes given as :class:`YoloBoxParts`; see :func:`yolo_box_iou`."""
    inter_w = (torch.minimum(a.x2, b.x2) - torch.maximum(a.x1, b.x1)).clamp(min=0)
    inter_h = (torch.minimum(a.y2, b.y2) - torch.maximum(a.y1, b.y1)).clamp(min=0)
    inter = inter_w * inter_h
    iou = inter / (a.area + b.area - inter + eps)
    if kind == "iou":
        return iou
    cent = (a.cx - b.cx).square() + (a.cy - b.cy).square()
    cw = torch.maximum(a.x2, b.x2) - torch.minimum(a.x1, b.x1)
    ch = torch.maximum(a.y2, b.y2) - torch.minimum(a.y1, b.y1)
    diag = cw.square() + ch.square() + eps
    v = _V_SCALE * (a.angle - b.angle).square()
    with torch.no_grad():
        alpha = v / (v - iou + 1 + eps)
    return iou - cent / diag - alpha * v


def yolo_box_iou(b1: Tensor, b2: Tensor, *, kind: YoloIoUKind = "ciou", eps: float = YOLO_IOU_EPS) -> Tensor:
    """IoU or CIoU of ``b1`` and ``b2`` with YOLO's ``eps`` placement, broadcast over the leading dims.

    Args:
        b1: ``(..., 4)`` boxes ``(x1, y1, x2, y2)``.
        b2: ``(..., 4)`` boxes, broadcastable with ``b1`` (``b1[:, None], b2[None]`` for all pairs).
        kind: ``"ciou"`` (``IoU - d^2 / (c^2 + eps) - alpha v``) or ``"iou"``.
        eps: added to the union, to ``c^2``, to the heights in ``atan(w / h)`` and to ``alpha``'s
            denominator.

    Returns:
        ``(...)`` values in the dtype of the inputs; CIoU lies in ``[-1.5, 1]``. Per-box quantities
        (areas, centres, aspect angles) are computed before broadcasting.
    """
    if kind not in ("iou", "ciou"):
        raise ValueError(f"yolo_box_iou: kind must be 'iou' or 'ciou', got {kind!r}")
    return yolo_iou_of_parts(
        yolo_box_parts(*b1.unbind(-1), eps=eps), yolo_box_parts(*b2.unbind(-1), eps=eps), kind=kind, eps=eps
    )


@torch.no_grad()
def yolo_pairwise_ciou_(a: YoloBoxParts, b: YoloBoxParts, eps: float = YOLO_IOU_EPS) -> Tensor:
    """:func:`yolo_iou_of_parts` (CIoU, same operations in the same order, so the same values) without
    gradient, computed in place: ``b``'s tensors, of the output's shape, are overwritten as scratch.

    About 3 buffers of the output's size are allocated instead of about 30, which matters for the
    ``(G, A)`` matrices of the matcher: allocating and first touching large buffers costs as much as
    the arithmetic on CPU.
    """
    out = torch.minimum(a.x2, b.x2)
    tmp = torch.maximum(a.x1, b.x1)
    inter = out.sub_(tmp).clamp_(min=0)
    torch.minimum(a.y2, b.y2, out=tmp)
    tmp2 = torch.maximum(a.y1, b.y1)
    inter.mul_(tmp.sub_(tmp2).clamp_(min=0))
    torch.add(a.area, b.area, out=tmp).sub_(inter).add_(eps)
    iou = inter.div_(tmp)
    torch.sub(a.cx, b.cx, out=tmp).square_()
    tmp.add_(torch.sub(a.cy, b.cy, out=tmp2).square_())  # centre distance^2
    torch.maximum(a.x2, b.x2, out=tmp2).sub_(torch.minimum(a.x1, b.x1, out=b.x1)).square_()
    torch.maximum(a.y2, b.y2, out=b.x2).sub_(torch.minimum(a.y1, b.y1, out=b.y1)).square_()
    tmp2.add_(b.x2).add_(eps)  # enclosing diagonal^2
    tmp.div_(tmp2)
    v = torch.sub(a.angle, b.angle, out=tmp2).square_().mul_(_V_SCALE)
    alpha_v = torch.sub(v, iou, out=b.x1).add_(1).add_(eps)
    torch.div(v, alpha_v, out=alpha_v).mul_(v)
    return iou.sub_(tmp).sub_(alpha_v)
