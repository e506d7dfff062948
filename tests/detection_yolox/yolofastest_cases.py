# SPDX-License-Identifier: Apache-2.0
"""Seeded synthetic YOLO-Fastest batches ``(B, nA, 5 + C, H, W)`` for the tests and the benchmark."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from yolox_cases import random_boxes

#: NetsPresso Trainer's YOLO-Fastest-v2 anchors (pixels; strides 16 and 32 on a 352 input).
V2_ANCHORS = ((12.0, 18.0, 37.0, 49.0, 52.0, 132.0), (115.0, 73.0, 119.0, 199.0, 242.0, 238.0))


def _logit(p: float) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


def make_batch(
    seed: int,
    *,
    batch: int = 2,
    num_classes: int = 5,
    img: int = 352,
    strides: Sequence[int] = (16, 32),
    anchors: Sequence[Sequence[float]] = V2_ANCHORS,
    gts: tuple[int, int] = (1, 8),
    counts: Sequence[int] | None = None,
    kind: str = "random",
    max_size: float | None = None,
    informed: float = 0.5,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A batch of raw head outputs and ground truths.

    ``informed``: the fraction of boxes whose 3x3 neighbouring cells predict (a jittered copy of) the
    box with every anchor (clamped to what the decode can reach), so SimOTA picks several anchors.
    """
    gen = torch.Generator().manual_seed(seed)
    if counts is None:
        counts = [int(torch.randint(gts[0], gts[1] + 1, (1,), generator=gen)) for _ in range(batch)]
    pred = []
    for s, a in zip(strides, anchors):
        side = img // s
        pred.append(torch.randn(batch, len(a) // 2, 5 + num_classes, side, side, generator=gen))
    gt = []
    for i, n in enumerate(counts):
        boxes = random_boxes(n, img, gen, kind=kind, max_size=max_size)
        gt.append({"boxes": boxes, "labels": torch.randint(0, num_classes, (n,), generator=gen)})
        for j in range(n):
            if float(torch.rand((), generator=gen)) > informed:
                continue
            _inform(pred, i, boxes[j].tolist(), strides, anchors, gen)
    pred = [p.to(dtype).requires_grad_(True) for p in pred]
    return {"pred": pred}, {"gt": gt, "img_size": img}


def _inform(
    pred: list[Tensor],
    i: int,
    box: list[float],
    strides: Sequence[int],
    anchors: Sequence[Sequence[float]],
    gen: torch.Generator,
) -> None:
    x1, y1, x2, y2 = box
    cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, 0.5), max(y2 - y1, 0.5)
    for lvl, s in enumerate(strides):
        side = pred[lvl].shape[-1]
        gx, gy = int(cx // s), int(cy // s)
        for a in range(len(anchors[lvl]) // 2):
            aw, ah = anchors[lvl][2 * a], anchors[lvl][2 * a + 1]
            for yy in range(max(gy - 1, 0), min(gy + 2, side)):
                for xx in range(max(gx - 1, 0), min(gx + 2, side)):
                    jit = torch.randn(4, generator=gen) * 0.15
                    pred[lvl][i, a, 0, yy, xx] = _logit(cx / s - xx) + jit[0]
                    pred[lvl][i, a, 1, yy, xx] = _logit(cy / s - yy) + jit[1]
                    pred[lvl][i, a, 2, yy, xx] = math.log(3.0) + _logit(w / (4 * aw)) + jit[2]
                    pred[lvl][i, a, 3, yy, xx] = math.log(3.0) + _logit(h / (4 * ah)) + jit[3]


def fresh(out: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``out`` with new leaf tensors (for a second backward)."""
    return {"pred": [p.detach().clone().requires_grad_(True) for p in out["pred"]]}


def shared_model_grads(
    levels: list[Tensor], target: dict[str, Any], **fields: Any
) -> tuple[list[Tensor], Any]:
    """Gradients of the loss w.r.t. a shared per-level offset ``theta`` (a stand-in for model weights:
    ``pred = levels + theta``), and the loss terms."""
    from losskit_detection_yolox import YOLOFastestLoss

    theta = [torch.zeros_like(p[:1]).requires_grad_(True) for p in levels]
    crit = YOLOFastestLoss(anchors=V2_ANCHORS, **fields)
    terms = crit({"pred": [p + t for p, t in zip(levels, theta)]}, target)
    sum(terms.values()).backward()
    return [t.grad for t in theta], terms


def ddp_rank(rank: int, world_size: int, halves: list[tuple[list[Tensor], dict[str, Any]]]) -> dict[str, Any]:
    """One data-parallel rank (gloo): its half of the batch, DDP-style gradient averaging of ``theta``."""
    import torch.distributed as dist

    levels, target = halves[rank]
    result: dict[str, Any] = {}
    for flag in (True, False):
        grads, terms = shared_model_grads(levels, target, normalize_across_ranks=flag)
        for g in grads:
            dist.all_reduce(g)
            g /= world_size
        result[flag] = grads
        result["keys"] = (tuple(terms), tuple(terms.diagnostics))
        result["num_fg"] = float(terms.diagnostics["num_fg"])
    return result
