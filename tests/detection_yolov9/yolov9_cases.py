# SPDX-License-Identifier: Apache-2.0
"""Seeded inputs for the YOLOv9 tests and benchmark: head outputs and ground truths."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def levels(
    batch: int,
    shapes: list[tuple[int, int]],
    num_classes: int,
    *,
    reg_max: int = 16,
    gen: torch.Generator,
    bin_slope: float = 0.4,
    cls_bias: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> list[Tensor]:
    """Random head outputs; bin logits fall by ``bin_slope`` per bin (short predicted distances) and
    class logits are shifted by ``cls_bias``."""
    out = []
    slope = -bin_slope * torch.arange(reg_max, dtype=torch.float32).view(1, 1, reg_max, 1, 1)
    for h, w in shapes:
        reg = torch.randn(batch, 4, reg_max, h, w, generator=gen) + slope
        cls = torch.randn(batch, num_classes, h, w, generator=gen) + cls_bias
        p = torch.cat((reg.reshape(batch, 4 * reg_max, h, w), cls), 1).to(dtype)
        out.append(p.requires_grad_(True))
    return out


def boxes(
    n: int,
    img: tuple[int, int],
    num_classes: int,
    *,
    gen: torch.Generator,
    min_size: float = 4.0,
    max_size: float = 40.0,
) -> dict[str, Tensor]:
    """``n`` random boxes inside an ``(H, W)`` image and their labels."""
    h, w = img
    wh = torch.rand(n, 2, generator=gen) * (max_size - min_size) + min_size
    wh = torch.minimum(wh, torch.tensor([float(w), float(h)]))
    xy = torch.rand(n, 2, generator=gen) * (torch.tensor([float(w), float(h)]) - wh)
    return {
        "boxes": torch.cat((xy, xy + wh), 1),
        "labels": torch.randint(0, num_classes, (n,), generator=gen),
    }


def case(
    counts: list[int],
    *,
    img: tuple[int, int] = (64, 64),
    strides: tuple[int, ...] = (8, 16, 32),
    num_classes: int = 3,
    reg_max: int = 16,
    seed: int = 0,
    **kwargs: Any,
) -> tuple[list[Tensor], list[dict[str, Tensor]], tuple[int, int]]:
    """Levels of ``img`` at ``strides`` (grid ``ceil(size / s)``) and ``counts[i]`` boxes in image i."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(-(-img[0] // s), -(-img[1] // s)) for s in strides]
    size_kw = {k: kwargs.pop(k) for k in ("min_size", "max_size") if k in kwargs}
    pred = levels(len(counts), shapes, num_classes, reg_max=reg_max, gen=gen, **kwargs)
    gt = [boxes(n, img, num_classes, gen=gen, **size_kw) for n in counts]
    return pred, gt, img


def peak_memory(fn: Any) -> int:
    """Bytes: the peak of torch's CPU allocations while ``fn()`` runs, above the level at its start
    (from the profiler's memory events)."""
    import json
    import os
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]"]
    if not memory:
        return 0
    # "Total Allocated" keeps counting across profiler sessions: measure from the first event's level
    start = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(0, *(m["Total Allocated"] - start for m in memory))


def head_features(batch: int, img: int, *, seed: int) -> list[Tensor]:
    """Fixed random features of 8 channels at strides 8, 16, 32 of an ``img`` input."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 8, -(-img // s), -(-img // s), generator=gen) for s in (8, 16, 32)]


def shared_head_grads(
    feats: list[Tensor], target: dict[str, Any], *, normalize: bool, num_classes: int = 3
) -> list[Tensor]:
    """Gradients of a seeded 1x1 head shared by the levels, under ``yolov9_loss`` of one batch."""
    from losskit_detection_yolov9 import YOLOv9Loss

    torch.manual_seed(0)
    head = torch.nn.Conv2d(8, 4 * 16 + num_classes, 1)
    crit = YOLOv9Loss(normalize_across_ranks=normalize)
    terms = crit({"pred": [head(f) for f in feats]}, target)
    sum(terms.values()).backward()
    return [p.grad.detach().clone() for p in head.parameters()]  # type: ignore[union-attr]


def ddp_rank(rank: int, world: int, halves: list[tuple[list[Tensor], dict[str, Any]]]) -> dict[Any, Any]:
    """One gloo rank: the head's gradients averaged over ranks (as DDP does), normaliser on and off."""
    import torch.distributed as dist

    feats, target = halves[rank]
    result: dict[Any, Any] = {}
    for normalize in (True, False):
        grads = shared_head_grads(feats, target, normalize=normalize)
        for g in grads:
            dist.all_reduce(g)
            g /= world
        result[normalize] = grads
    return result
