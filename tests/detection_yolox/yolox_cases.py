# SPDX-License-Identifier: Apache-2.0
"""Seeded synthetic YOLOX batches for the tests and the benchmark."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def random_boxes(
    n: int,
    img: int,
    gen: torch.Generator,
    *,
    kind: str = "random",
    min_size: float = 4.0,
    max_size: float | None = None,
) -> Tensor:
    """``(n, 4)`` xyxy boxes inside an ``img x img`` input.

    kinds: ``random`` (sizes 4 .. img/2), ``tiny`` (0.05 .. 2 px), ``border`` (touching or straddling
    the image border, corners included), ``mixed`` (a mix of the three).
    """
    max_size = max_size if max_size is not None else img / 2
    if kind == "mixed":
        kinds = ["random", "tiny", "border"]
        pick = torch.randint(0, 3, (n,), generator=gen)
        parts = [random_boxes(1, img, gen, kind=kinds[int(p)]) for p in pick]
        return torch.cat(parts) if parts else torch.zeros(0, 4)
    if kind == "tiny":
        wh = torch.rand(n, 2, generator=gen) * 1.95 + 0.05
        c = torch.rand(n, 2, generator=gen) * img
    elif kind == "border":
        wh = torch.rand(n, 2, generator=gen) * (max_size - min_size) + min_size
        c = torch.rand(n, 2, generator=gen) * img
        side = torch.randint(0, 4, (n,), generator=gen)
        c[side == 0, 0] = 0.0
        c[side == 1, 0] = float(img)
        c[side == 2, 1] = 0.0
        c[side == 3, 1] = float(img)
        corner = torch.rand(n, generator=gen) < 0.3
        c[corner] = torch.randint(0, 2, (int(corner.sum()), 2), generator=gen).float() * img
    else:
        wh = torch.rand(n, 2, generator=gen) * (max_size - min_size) + min_size
        c = torch.rand(n, 2, generator=gen) * img
    lo = (c - wh / 2).clamp(0, img)
    hi = (c + wh / 2).clamp(0, img)
    hi = torch.maximum(hi, lo)  # border boxes may collapse to zero width: allowed
    return torch.cat((lo, hi), 1)


def make_batch(
    seed: int,
    *,
    batch: int = 2,
    num_classes: int = 5,
    img: int = 128,
    levels: Sequence[int] = (8, 16, 32),
    gts: tuple[int, int] = (1, 8),
    counts: Sequence[int] | None = None,
    kind: str = "random",
    informed: float = 0.5,
    duplicates: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A batch of raw head outputs and ground truths.

    ``gts``: a ``(low, high)`` range of boxes per image (inclusive); ``counts``: exact counts per image
    instead. ``informed``: fraction of the cells near a box whose prediction is set close to
    that box (so IoUs are high and SimOTA picks several anchors per box, with conflicts).
    """
    gen = torch.Generator().manual_seed(seed)
    if counts is None:
        counts = [int(torch.randint(gts[0], gts[1] + 1, (1,), generator=gen)) for _ in range(batch)]
    pred = []
    for s in levels:
        side = img // s
        p = torch.randn(batch, 5 + num_classes, side, side, generator=gen)
        p[:, 2:4] = p[:, 2:4] * 0.7 + math.log(3.0)
        pred.append(p)
    gt = []
    for i, n in enumerate(counts):
        boxes = random_boxes(n, img, gen, kind=kind)
        if duplicates and n >= 2:
            boxes[1::2] = boxes[0::2][: boxes[1::2].shape[0]]
        labels = torch.randint(0, num_classes, (n,), generator=gen)
        if duplicates and n >= 4:
            labels[3::4] = labels[2::4][: labels[3::4].shape[0]]
        gt.append({"boxes": boxes, "labels": labels})
        # informed predictions: cells around each box predict a jittered copy of it
        for j in range(n):
            if float(torch.rand((), generator=gen)) > informed:
                continue
            x1, y1, x2, y2 = boxes[j].tolist()
            cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, 0.5), max(y2 - y1, 0.5)
            for lvl, s in enumerate(levels):
                side = img // s
                gx, gy = int(cx // s), int(cy // s)
                for yy in range(max(gy - 1, 0), min(gy + 2, side)):
                    for xx in range(max(gx - 1, 0), min(gx + 2, side)):
                        jit = torch.randn(4, generator=gen) * 0.15
                        pred[lvl][i, 0, yy, xx] = cx / s - xx + jit[0]
                        pred[lvl][i, 1, yy, xx] = cy / s - yy + jit[1]
                        pred[lvl][i, 2, yy, xx] = math.log(w / s) + jit[2]
                        pred[lvl][i, 3, yy, xx] = math.log(h / s) + jit[3]
    pred = [p.to(dtype).requires_grad_(True) for p in pred]
    return {"pred": pred}, {"gt": gt, "img_size": img}


def fresh(out: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``out`` with new leaf tensors (for a second backward)."""
    return {"pred": [p.detach().clone().requires_grad_(True) for p in out["pred"]]}


def shared_model_grads(
    levels: list[Tensor], target: dict[str, Any], **fields: Any
) -> tuple[list[Tensor], Any]:
    """Gradients of the loss w.r.t. a shared per-level offset ``theta`` (a stand-in for model weights:
    ``pred = levels + theta``), and the loss terms."""
    from losskit_detection_yolox import YOLOXLoss

    theta = [torch.zeros_like(p[:1]).requires_grad_(True) for p in levels]
    crit = YOLOXLoss(**fields)
    crit.set_epoch(1)
    terms = crit({"pred": [p + t for p, t in zip(levels, theta)]}, target)
    terms.total.backward()
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
