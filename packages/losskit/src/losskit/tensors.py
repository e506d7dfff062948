# SPDX-License-Identifier: Apache-2.0
"""Small tensor chores every criterion needs, defined once: autocast off, a graph-keeping zero, the random
ground truths of the detection criteria's ``example()``."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

__all__ = ["autocast_off", "example_gt", "graph_zero"]


def autocast_off(device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
    """A context that disables autocast on ``device`` (a device or its type, ``"cuda"``).

    Criteria run their matching, box coding and reductions in the dtypes they choose (fp32 at least),
    whatever autocast region the training step runs in. A no-op for device types without autocast.
    """
    device_type = device if isinstance(device, str) else device.type
    is_available = getattr(torch.amp, "is_autocast_available", None)
    if is_available is not None and not is_available(device_type):
        return contextlib.nullcontext()
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except (RuntimeError, ValueError):  # pragma: no cover - torch without is_autocast_available
        return contextlib.nullcontext()


def graph_zero(*tensors: Tensor | None) -> Tensor:
    """A float32 scalar 0 connected to the graph of every given tensor.

    Its gradient with respect to each tensor is exactly zero, also where the tensor holds NaN or inf
    (it is an empty sum, not ``0 * x.sum()``, whose gradient is NaN there). Criteria return it for a
    term that has nothing to sum (no foreground, every pixel ignored) so that ``backward`` still
    reaches every parameter, as DDP requires. ``None`` entries are skipped; with none left the result
    is a plain CPU zero.
    """
    zero: Tensor | None = None
    for t in tensors:
        if t is None:
            continue
        part = t.reshape(-1)[:0].sum()
        part = part.float() if part.is_floating_point() else part.to(torch.float32)
        zero = part if zero is None else zero + part.to(zero.device)
    return torch.zeros(()) if zero is None else zero


def example_gt(
    batch_size: int,
    img_size: int,
    num_classes: int,
    *,
    generator: torch.Generator,
    device: torch.device | str | None = None,
    margin: float = 16.0,
    min_size: float = 4.0,
    spread: float = 40.0,
) -> list[dict[str, Tensor]]:
    """Random ground truths for a detection criterion's ``example()``: ``batch_size`` dicts
    ``{"boxes": (n, 4) xyxy pixels, "labels": (n,) int64}`` with 0 to 4 boxes each (at least one in
    the first image), corners in ``[0, img_size - margin)``, sides in ``[min_size, min_size + spread)``
    clipped to the image, labels in ``[0, num_classes)``."""
    gt = []
    for i in range(batch_size):
        n = int(torch.randint(1 if i == 0 else 0, 5, (1,), generator=generator))
        xy = torch.rand(n, 2, generator=generator) * (img_size - margin)
        wh = torch.rand(n, 2, generator=generator) * spread + min_size
        boxes = torch.cat((xy, (xy + wh).clamp(max=img_size)), dim=1)
        labels = torch.randint(0, num_classes, (n,), generator=generator)
        gt.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return gt
