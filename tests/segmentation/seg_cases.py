# SPDX-License-Identifier: Apache-2.0
"""Shared helpers of the seg_cross_entropy tests: the reference, seeded batches, the gloo worker.

Kept in a module with a unique top-level name so spawned ``torch.distributed`` ranks can import it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = 255


def reference(
    pred: Tensor,
    target: Tensor,
    *,
    ignore_index: int = IGNORE,
    label_smoothing: float = 0.0,
    class_weights: Tensor | None = None,
    align_corners: bool = False,
) -> Tensor:
    """The issue's reference: ``F.interpolate`` to label size, then ``F.cross_entropy`` (mean)."""
    up = F.interpolate(pred, size=target.shape[-2:], mode="bilinear", align_corners=align_corners)
    weight = None if class_weights is None else class_weights.to(pred.dtype)
    return F.cross_entropy(
        up, target, weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing
    )


def make_batch(
    batch: int,
    classes: int,
    h: int,
    w: int,
    height: int,
    width: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    ignore_fraction: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """Seeded logits (a leaf requiring grad) and labels with some ignored pixels."""
    g = torch.Generator().manual_seed(seed)
    pred = (2.0 * torch.randn(batch, classes, h, w, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, classes, (batch, height, width), generator=g)
    labels[torch.rand(batch, height, width, generator=g) < ignore_fraction] = IGNORE
    return pred.requires_grad_(), labels


def tiny_head(classes: int, seed: int = 0) -> torch.nn.Conv2d:
    """A 1x1 convolution from 3 feature channels to ``classes`` logits, float64, seeded."""
    torch.manual_seed(seed)
    return torch.nn.Conv2d(3, classes, kernel_size=1).double()


def ddp_worker(
    rank: int, world_size: int, features: Tensor, labels: Tensor, classes: int, weights: list[float]
) -> dict[bool, Any]:
    """One rank: the loss of its slice of the batch; parameter gradients averaged over ranks as DDP does."""
    import torch.distributed as dist

    from losskit_segmentation import SegCrossEntropy

    per = features.shape[0] // world_size
    part = slice(rank * per, (rank + 1) * per)
    result: dict[bool, Any] = {}
    for flag in (True, False):
        model = tiny_head(classes)
        crit = SegCrossEntropy(normalize_across_ranks=flag, class_weights=weights, label_smoothing=0.1)
        loss = crit({"pred": model(features[part])}, {"target": labels[part]})
        loss.backward()
        averaged = {}
        for name, param in model.named_parameters():
            g = param.grad.detach().clone()
            dist.all_reduce(g)
            averaged[name] = g / world_size
        result[flag] = averaged
    return result
