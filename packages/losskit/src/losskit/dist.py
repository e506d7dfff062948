# SPDX-License-Identifier: Apache-2.0
"""Data-parallel helpers shared by criteria.

Criteria whose normaliser is a count over the batch (foreground anchors, valid pixels) take the field
``normalize_across_ranks``: when true and ``torch.distributed`` is initialised, the count is averaged
over the ranks of the default process group before it divides the loss, then clamped. Since DDP averages
gradients over ranks, the averaged gradient then equals the gradient of the whole global batch
normalised by its global count, as on a single process. Without an initialised process group it is a
no-op.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["global_mean", "is_distributed"]


def is_distributed() -> bool:
    """Whether a default process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_mean(count: Tensor, *, enabled: bool, min: float | None = 1.0) -> Tensor:
    """The mean of ``count`` over ranks (when ``enabled`` and distributed), clamped below at ``min``.

    ``count`` is detached and must be a floating tensor; the clamp is applied after the reduction.
    The all-reduce is asynchronous to the host (no ``.item()``): it only orders device work.
    """
    count = count.detach()
    if not count.is_floating_point():
        count = count.to(torch.float32)
    if enabled and is_distributed():
        count = count.clone()
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
        count = count / dist.get_world_size()
    if min is not None:
        count = count.clamp(min=min)
    return count
