# SPDX-License-Identifier: Apache-2.0
"""Online hard example mining (OHEM) for pixel-wise cross-entropy, as PIDNet's ``OhemCrossEntropy``.

Among the candidate pixels, those whose predicted probability of the true class is below a threshold
are kept. The threshold is ``max(thresh, v)``, where ``v`` is the candidate probability at 0-based rank
``min(min_kept, n - 1)`` in ascending order (``n`` candidates): the ``(min_kept + 1)``-th smallest, or
the largest when there are at most ``min_kept`` candidates. So at least ``min_kept`` pixels are kept
(fewer only on ties or when there are fewer candidates), and every pixel below ``thresh`` is kept.
The selection is over the whole batch given (one rank's batch under data parallel), not per image.

Everything stays on the device: ``kthvalue`` replaces the reference's sort, and the "fewer candidates
than ``min_kept``" case is a ``torch.where``, not a Python branch.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ohem_mask"]


@torch.no_grad()
def ohem_mask(prob: Tensor, candidates: Tensor, *, thresh: float, min_kept: int) -> Tensor:
    """The pixels OHEM keeps.

    Args:
        prob: ``(*)`` predicted probability of each pixel's true class.
        candidates: ``(*)`` bool, the pixels that may be kept (not ignored).
        thresh: probability threshold; candidates below it are always kept.
        min_kept: the threshold is raised to the ``(min_kept + 1)``-th smallest candidate probability.

    Returns:
        ``(*)`` bool mask, a subset of ``candidates``. Empty when there are no candidates.
    """
    flat = prob.detach().reshape(-1)
    mask = candidates.reshape(-1)
    inf = torch.full((), float("inf"), dtype=flat.dtype, device=flat.device)
    largest = torch.where(mask, flat, -inf).amax() if flat.numel() else -inf
    if flat.numel() > min_kept:
        ranked = torch.where(mask, flat, inf).kthvalue(min_kept + 1).values
        count = mask.sum()
        cutoff = torch.where(count > min_kept, ranked, largest)
    else:  # at most min_kept candidates: rank n - 1 is the largest candidate
        cutoff = largest
    threshold = cutoff.clamp(min=thresh)
    return candidates & (prob.detach() < threshold)
