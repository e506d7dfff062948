# SPDX-License-Identifier: Apache-2.0
"""A per-image reference of the YOLOX loss that follows the *structure* of YOLOX's
``yolo_head.py`` (main): a Python loop over images, a ``(num_gt, candidates, C)`` class cost,
a Python loop over ground truths for the dynamic-k selection, conflict resolution over all the
image's ground truths, then concatenated targets. Written for losskit's parity tests and benchmark
(not derived from YOLOX's text); used as the ground truth that ``yolox_loss`` must reproduce.

It takes losskit's inputs (``pred`` levels ``(B, 5 + C, H, W)``, ``gt`` dicts with xyxy boxes) and a
single stride per level (``img_size / W_l``), like YOLOX. Like YOLOX it raises when an image has
ground truths but no candidate anchor at all.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_convert


def _iou_cxcywh(a: Tensor, b: Tensor) -> Tensor:
    """(N, M) IoU of (N, 4) and (M, 4) centre-size boxes, computed as YOLOX's ``bboxes_iou``."""
    a_lo, a_hi = a[:, None, :2] - a[:, None, 2:] / 2, a[:, None, :2] + a[:, None, 2:] / 2
    b_lo, b_hi = b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2
    lo = torch.max(a_lo, b_lo)
    hi = torch.min(a_hi, b_hi)
    area_a = torch.prod(a[:, 2:], 1)
    area_b = torch.prod(b[:, 2:], 1)
    overlap = (lo < hi).type(lo.type()).prod(dim=2)
    inter = torch.prod(hi - lo, 2) * overlap
    return inter / (area_a[:, None] + area_b - inter)


def _iou_loss(pred: Tensor, target: Tensor, kind: str) -> Tensor:
    lo = torch.max(pred[:, :2] - pred[:, 2:] / 2, target[:, :2] - target[:, 2:] / 2)
    hi = torch.min(pred[:, :2] + pred[:, 2:] / 2, target[:, :2] + target[:, 2:] / 2)
    area_p = torch.prod(pred[:, 2:], 1)
    area_t = torch.prod(target[:, 2:], 1)
    overlap = (lo < hi).type(lo.type()).prod(dim=1)
    inter = torch.prod(hi - lo, 1) * overlap
    union = area_p + area_t - inter
    iou = inter / (union + 1e-16)
    if kind == "iou":
        return 1 - iou**2
    c_lo = torch.min(pred[:, :2] - pred[:, 2:] / 2, target[:, :2] - target[:, 2:] / 2)
    c_hi = torch.max(pred[:, :2] + pred[:, 2:] / 2, target[:, :2] + target[:, 2:] / 2)
    area_c = torch.prod(c_hi - c_lo, 1)
    giou = iou - (area_c - union) / area_c.clamp(1e-16)
    return 1 - giou.clamp(min=-1.0, max=1.0)


class ReferenceYOLOX:
    """Upstream-structured YOLOX loss. ``__call__`` returns ``(terms, assignments)``."""

    def __init__(
        self,
        num_classes: int,
        *,
        reg_weight: float = 5.0,
        center_radius: float = 1.5,
        candidate_topk: int = 10,
        iou_cost_weight: float = 3.0,
        iou_loss: str = "iou",
        use_l1: bool = False,
    ) -> None:
        self.num_classes = num_classes
        self.reg_weight = reg_weight
        self.center_radius = center_radius
        self.candidate_topk = candidate_topk
        self.iou_cost_weight = iou_cost_weight
        self.iou_loss = iou_loss
        self.use_l1 = use_l1
        #: what the assignments exercised: ground truths, ones with dynamic_k > 1, anchors chosen by
        #: several ground truths, ground truths whose dynamic_k exceeded their prior cells.
        self.stats: Counter[str] = Counter()

    # -- head side: flatten and decode every level ------------------------------------------
    def _flatten(self, pred: list[Tensor], img_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        outputs, raws, xs, ys, strides = [], [], [], [], []
        for level in pred:
            b, ch, h, w = level.shape
            stride = img_size / w
            out = level.reshape(b, ch, h * w).permute(0, 2, 1)
            gy, gx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            grid = torch.stack((gx, gy), 2).reshape(1, h * w, 2).to(level.dtype)
            raws.append(out[..., :4].clone())
            decoded = torch.cat(
                [(out[..., :2] + grid) * stride, torch.exp(out[..., 2:4]) * stride, out[..., 4:]], dim=-1
            )
            outputs.append(decoded)
            xs.append(grid[..., 0])
            ys.append(grid[..., 1])
            strides.append(torch.zeros(1, h * w).fill_(stride).type_as(level))
        return (
            torch.cat(outputs, 1),
            torch.cat(raws, 1),
            torch.cat(xs, 1),
            torch.cat(ys, 1),
            torch.cat(strides, 1),
        )

    # -- assignment of one image --------------------------------------------------------------
    def _geometry(self, gt: Tensor, strides: Tensor, xs: Tensor, ys: Tensor) -> tuple[Tensor, Tensor]:
        s = strides[0]
        x_centres = ((xs[0] + 0.5) * s).unsqueeze(0)
        y_centres = ((ys[0] + 0.5) * s).unsqueeze(0)
        dist = s.unsqueeze(0) * self.center_radius
        left = gt[:, 0:1] - dist
        right = gt[:, 0:1] + dist
        top = gt[:, 1:2] - dist
        bottom = gt[:, 1:2] + dist
        deltas = torch.stack([x_centres - left, y_centres - top, right - x_centres, bottom - y_centres], 2)
        inside = deltas.min(dim=-1).values > 0.0
        candidates = inside.sum(dim=0) > 0
        return candidates, inside[:, candidates]

    @torch.no_grad()
    def _assign_image(
        self,
        gt: Tensor,
        gt_classes: Tensor,
        boxes: Tensor,
        cls_logits: Tensor,
        obj_logits: Tensor,
        strides: Tensor,
        xs: Tensor,
        ys: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        num_gt = gt.shape[0]
        fg_mask, relation = self._geometry(gt, strides, xs, ys)
        boxes = boxes[fg_mask]
        cls_c = cls_logits[fg_mask]
        obj_c = obj_logits[fg_mask]
        n_cand = boxes.shape[0]

        ious = _iou_cxcywh(gt, boxes)
        onehot = F.one_hot(gt_classes.to(torch.int64), self.num_classes).float()
        iou_cost = -torch.log(ious + 1e-8)
        with torch.autocast("cpu", enabled=False):
            q = (cls_c.float().sigmoid() * obj_c.float().sigmoid()).sqrt()
            cls_cost = F.binary_cross_entropy(
                q.unsqueeze(0).repeat(num_gt, 1, 1),
                onehot.unsqueeze(1).repeat(1, n_cand, 1),
                reduction="none",
            ).sum(-1)
        cost = cls_cost + self.iou_cost_weight * iou_cost + 1e6 * (~relation)

        matching = torch.zeros_like(cost, dtype=torch.uint8)
        top = min(self.candidate_topk, n_cand)
        top_ious, _ = torch.topk(ious, top, dim=1)
        dynamic_ks = torch.clamp(top_ious.sum(1).int(), min=1)
        for g in range(num_gt):
            _, chosen = torch.topk(cost[g], k=int(dynamic_ks[g]), largest=False)
            matching[g][chosen] = 1
        per_anchor = matching.sum(0)
        self.stats["gts"] += num_gt
        self.stats["dynamic_k>1"] += int((dynamic_ks > 1).sum())
        self.stats["conflicts"] += int((per_anchor > 1).sum())
        self.stats["k>prior"] += int((dynamic_ks > relation.sum(1)).sum())
        if per_anchor.max() > 1:
            several = per_anchor > 1
            _, best = torch.min(cost[:, several], dim=0)
            matching[:, several] *= 0
            matching[best, several] = 1
        fg_in_cand = per_anchor > 0
        fg_mask[fg_mask.clone()] = fg_in_cand
        matched = matching[:, fg_in_cand].argmax(0)
        matched_ious = (matching * ious).sum(0)[fg_in_cand]
        return fg_mask, matched, gt_classes[matched], matched_ious

    # -- the loss -------------------------------------------------------------------------------
    def __call__(
        self, pred: list[Tensor], gts: list[dict[str, Tensor]], img_size: int
    ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        outputs, raws, xs, ys, strides = self._flatten(pred, img_size)
        bbox = outputs[:, :, :4]
        obj = outputs[:, :, 4:5]
        cls = outputs[:, :, 5:]
        total = outputs.shape[1]
        cls_t, reg_t, l1_t, obj_t, fg_masks, assignments = [], [], [], [], [], []
        num_fg = 0.0
        for i in range(outputs.shape[0]):
            gt = box_convert(gts[i]["boxes"].float(), "xyxy", "cxcywh")
            classes = gts[i]["labels"]
            num_gt = gt.shape[0]
            if num_gt == 0:
                cls_t.append(outputs.new_zeros((0, self.num_classes)))
                reg_t.append(outputs.new_zeros((0, 4)))
                l1_t.append(outputs.new_zeros((0, 4)))
                obj_t.append(outputs.new_zeros((total, 1)))
                fg = outputs.new_zeros(total).bool()
                assignments.append(
                    {"fg_mask": fg, "matched_gt": torch.full((total,), -1), "matched_iou": torch.zeros(total)}
                )
            else:
                fg, matched, matched_cls, matched_ious = self._assign_image(
                    gt, classes, bbox[i].detach(), cls[i].detach(), obj[i].detach(), strides, xs, ys
                )
                num_fg += int(fg.sum())
                cls_t.append(
                    F.one_hot(matched_cls.to(torch.int64), self.num_classes) * matched_ious.unsqueeze(-1)
                )
                reg_t.append(gt[matched])
                obj_t.append(fg.unsqueeze(-1).to(outputs.dtype))
                target = gt[matched]
                s = strides[0][fg]
                l1 = outputs.new_zeros((target.shape[0], 4))
                l1[:, 0] = target[:, 0] / s - xs[0][fg]
                l1[:, 1] = target[:, 1] / s - ys[0][fg]
                l1[:, 2] = torch.log(target[:, 2] / s + 1e-8)
                l1[:, 3] = torch.log(target[:, 3] / s + 1e-8)
                l1_t.append(l1)
                gt_index = torch.full((total,), -1)
                gt_index[fg] = matched
                iou_full = torch.zeros(total)
                iou_full[fg] = matched_ious
                assignments.append({"fg_mask": fg, "matched_gt": gt_index, "matched_iou": iou_full})
            fg_masks.append(fg)
        cls_targets = torch.cat(cls_t, 0)
        reg_targets = torch.cat(reg_t, 0)
        obj_targets = torch.cat(obj_t, 0)
        l1_targets = torch.cat(l1_t, 0)
        fg_all = torch.cat(fg_masks, 0)
        denom = max(num_fg, 1)
        loss_iou = _iou_loss(bbox.reshape(-1, 4)[fg_all], reg_targets, self.iou_loss).sum() / denom
        loss_obj = (
            F.binary_cross_entropy_with_logits(obj.reshape(-1, 1), obj_targets, reduction="none").sum()
            / denom
        )
        loss_cls = (
            F.binary_cross_entropy_with_logits(
                cls.reshape(-1, self.num_classes)[fg_all], cls_targets, reduction="none"
            ).sum()
            / denom
        )
        if self.use_l1:
            loss_l1 = (raws.reshape(-1, 4)[fg_all] - l1_targets).abs().sum() / denom
        else:
            loss_l1 = outputs.new_zeros(())
        terms = {"iou": self.reg_weight * loss_iou, "obj": loss_obj, "cls": loss_cls, "l1": loss_l1}
        return terms, assignments


def reference_terms(
    pred: list[Tensor], gts: list[dict[str, Tensor]], img_size: int, **kw: Any
) -> dict[str, Tensor]:
    num_classes = pred[0].shape[1] - 5
    return ReferenceYOLOX(num_classes, **kw)(pred, gts, img_size)[0]
