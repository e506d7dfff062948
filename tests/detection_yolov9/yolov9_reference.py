# SPDX-License-Identifier: Apache-2.0
"""A per-image reference of the YOLOv9 loss, written from a reading of upstream (not copied).

It follows the structure of NetsPresso Trainer's ``YOLOv9Loss`` (a port of MultimediaTechLab/YOLO at
5c767f2): decode every anchor with gradient (softmax over the bins, expectation), match each image
with dense ``(n, A)`` matrices, build dense ``(B, A, C)`` soft class targets from a one-hot, then
``BCEWithLogits`` over all of them, the CIoU of the picked foreground boxes (through the pairwise
matrix's diagonal, as upstream) and the DFL on the picked foreground bins, all divided by
``max(sum of the targets, 1)`` read on the host. The ``upstream`` assigner follows PR #125.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def ciou(b1: Tensor, b2: Tensor, eps: float = 1e-7) -> Tensor:
    """CIoU of broadcastable ``(..., 4)`` xyxy boxes with YOLO's eps placement, alpha detached."""
    b1, b2 = b1.float(), b2.float()
    iw = (torch.min(b1[..., 2], b2[..., 2]) - torch.max(b1[..., 0], b2[..., 0])).clamp(min=0)
    ih = (torch.min(b1[..., 3], b2[..., 3]) - torch.max(b1[..., 1], b2[..., 1])).clamp(min=0)
    inter = iw * ih
    w1, h1 = b1[..., 2] - b1[..., 0], b1[..., 3] - b1[..., 1]
    w2, h2 = b2[..., 2] - b2[..., 0], b2[..., 3] - b2[..., 1]
    iou = inter / (w1 * h1 + w2 * h2 - inter + eps)
    centre = ((b1[..., 2] + b1[..., 0]) / 2 - (b2[..., 2] + b2[..., 0]) / 2) ** 2 + (
        (b1[..., 3] + b1[..., 1]) / 2 - (b2[..., 3] + b2[..., 1]) / 2
    ) ** 2
    cw = torch.max(b1[..., 2], b2[..., 2]) - torch.min(b1[..., 0], b2[..., 0])
    ch = torch.max(b1[..., 3], b2[..., 3]) - torch.min(b1[..., 1], b2[..., 1])
    diag = cw**2 + ch**2 + eps
    v = (4 / math.pi**2) * (torch.atan(w1 / (h1 + eps)) - torch.atan(w2 / (h2 + eps))) ** 2
    with torch.no_grad():
        alpha = v / (v - iou + 1 + eps)
    return iou - centre / diag - alpha * v


def anchors(img_size: int | tuple[int, int], shapes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """``(A, 2)`` centres ``(x s + s // 2, y s + s // 2)`` and ``(A,)`` strides ``W // W_l``."""
    width = img_size if isinstance(img_size, int) else img_size[1]
    centres, strides = [], []
    for h, w in shapes:
        s = width // w
        ys, xs = torch.meshgrid(torch.arange(h) * s + s // 2, torch.arange(w) * s + s // 2, indexing="ij")
        centres.append(torch.stack((xs.flatten(), ys.flatten()), -1).float())
        strides.append(torch.full((h * w,), float(s)))
    return torch.cat(centres), torch.cat(strides)


@dataclass
class ImageMatch:
    fg: Tensor  # (A,) bool
    matched: Tensor  # (A,) int64, -1 background
    target_cls: Tensor  # (A, C) float
    target_box: Tensor  # (A, 4) pixels


class ReferenceYOLOv9:
    """The YOLOv9 loss, one image at a time in the matcher."""

    def __init__(
        self,
        num_classes: int,
        *,
        reg_max: int = 16,
        topk: int = 10,
        iou_factor: float = 6.0,
        cls_factor: float = 0.5,
        weights: tuple[float, float, float] = (0.5, 7.5, 1.5),
        assigner: str = "netspresso",
    ) -> None:
        self.c, self.r, self.topk = num_classes, reg_max, topk
        self.iou_factor, self.cls_factor = iou_factor, cls_factor
        self.weights, self.assigner = weights, assigner

    def decode(self, levels: list[Tensor], centre: Tensor, stride: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, A, C)`` class logits, ``(B, A, 4, R)`` bin logits and ``(B, A, 4)`` boxes in pixels."""
        cls, bins = [], []
        for p in levels:
            b, _, h, w = p.shape
            bins.append(p[:, : 4 * self.r].reshape(b, 4, self.r, h * w).permute(0, 3, 1, 2))
            cls.append(p[:, 4 * self.r :].reshape(b, self.c, h * w).permute(0, 2, 1))
        logits, dist_logits = torch.cat(cls, 1), torch.cat(bins, 1)
        dist = (dist_logits.softmax(-1) * torch.arange(self.r, dtype=dist_logits.dtype)).sum(-1)
        dist = dist * stride[None, :, None]
        box = torch.cat((centre - dist[..., :2], centre + dist[..., 2:]), -1)
        return logits, dist_logits, box

    def match(
        self, logits: Tensor, box: Tensor, gt_box: Tensor, gt_cls: Tensor, centre: Tensor, stride: Tensor
    ) -> ImageMatch:
        a = box.shape[0]
        n = gt_box.shape[0]
        if n == 0:
            return ImageMatch(
                torch.zeros(a, dtype=torch.bool),
                torch.full((a,), -1),
                torch.zeros(a, self.c),
                torch.zeros(a, 4),
            )
        gt_box = gt_box.float()
        ax, ay = centre[:, 0][None], centre[:, 1][None]
        x1, y1, x2, y2 = (gt_box[:, i : i + 1] for i in range(4))
        iou = ciou(gt_box[:, None], box[None]).clamp(0, 1)  # (n, A)
        prob = logits.sigmoid().T[gt_cls]  # (n, A)
        if self.assigner == "netspresso":
            grid = (x1 < ax) & (ax < x2) & (y1 < ay) & (ay < y2)
            score = grid * iou**self.iou_factor * prob**self.cls_factor
            ranked = score
        else:
            dist = torch.stack((ax - x1, ay - y1, x2 - ax, y2 - ay), -1) / stride[None, :, None]
            grid = (dist.amin(-1) >= 0) & (dist.amax(-1) <= self.r - 1.01)
            score = iou**self.iou_factor * prob**self.cls_factor
            ranked = grid * score
        values, index = ranked.topk(min(self.topk, a), dim=1)
        kept = torch.zeros(n, a).scatter(1, index, values) > 0
        if self.assigner == "upstream":  # a ground truth with no anchor gets its best one
            best, where = score.max(dim=1)
            lonely = ~kept.any(1) & (best > 0)
            kept[lonely, where[lonely]] = True
        owner_iou = iou if self.assigner == "netspresso" else iou * kept
        # an anchor kept twice goes to the ground truth of largest CIoU
        twice = kept.sum(0, keepdim=True) > 1
        final = torch.where(twice, F.one_hot(owner_iou.argmax(0), n).T.bool(), kept)
        fg = final.any(0)
        owner = final.to(torch.uint8).argmax(0)
        held, held_iou = score * final, iou * final
        norm = held / (held.amax(1, keepdim=True) + 1e-9) * held_iou.amax(1, keepdim=True)
        value = norm.gather(0, owner[None])[0] * fg
        target_cls = F.one_hot(gt_cls[owner], self.c).float() * value[:, None]
        return ImageMatch(fg, torch.where(fg, owner, -1), target_cls, gt_box[owner])

    def __call__(
        self, levels: list[Tensor], gt: list[dict[str, Tensor]], img_size: Any
    ) -> tuple[dict[str, Tensor], list[ImageMatch]]:
        shapes = [(p.shape[2], p.shape[3]) for p in levels]
        centre, stride = anchors(img_size, shapes)
        logits, dist_logits, box = self.decode(levels, centre, stride)
        matches = [
            self.match(logits[i].detach(), box[i].detach(), t["boxes"], t["labels"], centre, stride)
            for i, t in enumerate(gt)
        ]
        target_cls = torch.stack([m.target_cls for m in matches])
        target_box = torch.stack([m.target_box for m in matches]) / stride[None, :, None]
        fg = torch.stack([m.fg for m in matches])
        cls_norm = max(float(target_cls.sum()), 1.0)
        box_norm = target_cls.sum(-1)[fg]
        cls = F.binary_cross_entropy_with_logits(logits, target_cls, reduction="none").sum() / cls_norm
        pred_box = (box / stride[None, :, None])[fg]
        picked_target = target_box[fg]
        iou = ciou(pred_box[:, None], picked_target[None]).diagonal()  # upstream's pairwise matrix
        iou_loss = ((1 - iou) * box_norm).sum() / cls_norm
        anchor_norm = centre / stride[:, None]
        dist = torch.cat((anchor_norm - target_box[..., :2], target_box[..., 2:] - anchor_norm), -1)
        dist = dist.clamp(0, self.r - 1.01)[fg].reshape(-1)
        picked = dist_logits[fg].reshape(-1, self.r)
        left = dist.floor()
        right = left + 1
        dfl = F.cross_entropy(picked, left.long(), reduction="none") * (right - dist) + F.cross_entropy(
            picked, right.long(), reduction="none"
        ) * (dist - left)
        dfl_loss = (dfl.reshape(-1, 4).mean(-1) * box_norm).sum() / cls_norm
        w_cls, w_iou, w_dfl = self.weights
        terms = {"cls": w_cls * cls, "iou": w_iou * iou_loss, "dfl": w_dfl * dfl_loss}
        return terms, matches
