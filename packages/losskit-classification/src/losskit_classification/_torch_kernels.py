# SPDX-License-Identifier: Apache-2.0
"""The two torch kernels cross-entropy calls directly, each with a public fallback.

The only place in this package that touches private torch API. ``F.cross_entropy`` is a Python
function that forwards to the binding ``torch._C._nn.cross_entropy_loss``; calling that binding saves
the wrapper's ~1 µs, which matters at small sizes (the criterion must stay within 5% of
``F.cross_entropy``). The NLL forward (``aten::nll_loss_forward`` / ``nll_loss2d_forward``) returns the
mean's denominator (the count or class-weight sum of the non-ignored elements) next to the sum, for
free. When a binding is missing (another torch build or release), the public API computes the same:
``F.cross_entropy`` itself, and ``F.nll_loss`` with the denominator counted separately (one more pass
over the targets).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PRIVATE_BINDINGS", "cross_entropy_mean", "nll_sum_and_count"]

#: ``at::Reduction`` codes: the private bindings take the reduction as this integer.
_MEAN, _SUM = 1, 2


def _bindings() -> tuple[Callable[..., Tensor], Any, Any] | None:
    try:
        return (
            torch._C._nn.cross_entropy_loss,
            torch.ops.aten.nll_loss_forward.default,
            torch.ops.aten.nll_loss2d_forward.default,
        )
    except (AttributeError, RuntimeError):  # pragma: no cover - a torch without them
        return None


#: The private bindings, or ``None`` where this torch lacks one of them (tests set it to ``None`` to
#: run the public fallback).
PRIVATE_BINDINGS = _bindings()


def cross_entropy_mean(
    x: Tensor, t: Tensor, weight: Tensor | None, ignore_index: int, label_smoothing: float
) -> Tensor:
    """``F.cross_entropy(x, t, weight, ignore_index=..., label_smoothing=...)`` (mean reduction).

    NaN (0 / 0) when every element is ignored, as torch gives.
    """
    if PRIVATE_BINDINGS is None:
        return F.cross_entropy(x, t, weight, ignore_index=ignore_index, label_smoothing=label_smoothing)
    return PRIVATE_BINDINGS[0](x, t, weight, _MEAN, ignore_index, label_smoothing)


def nll_sum_and_count(
    logp: Tensor, t: Tensor, weight: Tensor | None, ignore_index: int
) -> tuple[Tensor, Tensor]:
    """The summed NLL of ``F.nll_loss(logp, t, weight, ignore_index=..., reduction="sum")`` and the
    denominator of its mean: the class-weight sum (the count without weights) of the non-ignored
    elements, both in ``logp``'s dtype.

    ``logp``: ``(N, C)`` or ``(N, C, d1, ..., dk)`` log-probabilities; ``t``: int64 ``(N, d1, ..., dk)``.
    """
    if PRIVATE_BINDINGS is None:
        return _nll_sum_and_count_public(logp, t, weight, ignore_index)
    if logp.dim() == 2:
        nll, count = PRIVATE_BINDINGS[1](logp, t, weight, _SUM, ignore_index)
    else:  # (N, C, d1, ..., dk) as the (N, C, H, W) the 2-D kernel takes: views, no copy
        n, c, d = logp.shape[0], logp.shape[1], math.prod(logp.shape[2:])
        nll, count = PRIVATE_BINDINGS[2](
            logp.reshape(n, c, d, 1), t.reshape(n, d, 1), weight, _SUM, ignore_index
        )
    return nll, count


def _nll_sum_and_count_public(
    logp: Tensor, t: Tensor, weight: Tensor | None, ignore_index: int
) -> tuple[Tensor, Tensor]:
    nll = F.nll_loss(logp, t, weight, ignore_index=ignore_index, reduction="sum")  # checks the range
    counted = t != ignore_index
    if weight is None:
        count = counted.sum().to(logp.dtype)
    else:
        count = torch.where(counted, weight[torch.where(counted, t, 0)], 0.0).sum()
    return nll, count
