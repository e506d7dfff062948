# SPDX-License-Identifier: Apache-2.0
"""Shared helpers of the pidnet_loss tests: the reference formula, batches, the gloo worker.

Kept in a module with a unique top-level name so spawned ``torch.distributed`` ranks can import it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = 255


def reference_ce(logits: Tensor, labels: Tensor, ignore_index: int, class_weights: Tensor | None) -> Tensor:
    """Mean (class-weighted) NLL over non-ignored pixels; NaN when there are none, like F.cross_entropy."""
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    nll = -logits.log_softmax(dim=1).gather(1, safe[:, None])[:, 0]
    w = valid.to(logits.dtype) if class_weights is None else class_weights.to(logits.dtype)[safe] * valid
    return (nll * w).sum() / w.sum()


def reference_terms(
    pred: Tensor,
    extra_p: Tensor,
    extra_d: Tensor,
    target: Tensor,
    bd_gt: Tensor,
    *,
    ignore_index: int = IGNORE,
    balance_weights: tuple[float, float] = (0.4, 1.0),
    boundary_weight: float = 20.0,
    boundary_ce_weight: float = 1.0,
    boundary_threshold: float = 0.8,
    class_weights: Tensor | None = None,
    align_corners: bool = True,
) -> dict[str, Tensor]:
    """The issue's formula, term by term, written directly on the upsampled logits (float64)."""
    size = target.shape[-2:]

    def up(x: Tensor) -> Tensor:
        return F.interpolate(x.double(), size=size, mode="bilinear", align_corners=align_corners)

    p, i, d = up(extra_p), up(pred), up(extra_d)[:, 0]
    ce = balance_weights[0] * reference_ce(p, target, ignore_index, class_weights) + balance_weights[
        1
    ] * reference_ce(i, target, ignore_index, class_weights)
    t = bd_gt.double()
    pos, neg = t == 1, t == 0
    n_pos, n_neg = pos.sum().double(), neg.sum().double()
    weight = torch.where(pos, n_neg / (n_pos + n_neg), torch.where(neg, n_pos / (n_pos + n_neg), 0.0))
    bce = F.softplus(d) - d * t  # -t log(sigmoid d) - (1 - t) log(1 - sigmoid d)
    boundary = boundary_weight * (weight * bce).mean()
    bd_label = torch.where(torch.sigmoid(d) > boundary_threshold, target, ignore_index)
    boundary_ce = boundary_ce_weight * reference_ce(i, bd_label, ignore_index, class_weights)
    return {"ce": ce, "boundary": boundary, "boundary_ce": boundary_ce}


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
    d_scale: float = 2.0,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Seeded logits (leaves requiring grad) and targets with some ignored pixels and boundaries."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (batch, height, width), generator=g)
    labels[torch.rand(batch, height, width, generator=g) < ignore_fraction] = IGNORE
    bd_gt = (torch.rand(batch, height, width, generator=g) < 0.2).to(dtype)
    out = {
        "pred": torch.randn(batch, classes, h, w, generator=g, dtype=dtype),
        "extra_p": torch.randn(batch, classes, h, w, generator=g, dtype=dtype),
        "extra_d": d_scale * torch.randn(batch, 1, h, w, generator=g, dtype=dtype),
    }
    return {k: v.requires_grad_() for k, v in out.items()}, {"target": labels, "bd_gt": bd_gt}


def grads(value: Tensor, inputs: list[Tensor]) -> list[Tensor]:
    """d value / d inputs (zeros for inputs the value does not depend on)."""
    got = torch.autograd.grad(value, inputs, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(got, inputs)]


def tiny_heads(classes: int, seed: int = 0) -> torch.nn.Conv2d:
    """A 1x1 convolution producing the three heads (``2 * classes + 1`` channels), float64, seeded."""
    torch.manual_seed(seed)
    return torch.nn.Conv2d(3, 2 * classes + 1, kernel_size=1).double()


def split_heads(logits: Tensor, classes: int) -> dict[str, Tensor]:
    return {
        "pred": logits[:, :classes],
        "extra_p": logits[:, classes : 2 * classes],
        "extra_d": logits[:, 2 * classes :],
    }


def ddp_worker(
    rank: int, world_size: int, features: Tensor, target: dict[str, Tensor], classes: int
) -> dict[bool, Any]:
    """One rank: the loss of its slice of the batch; parameter gradients averaged over ranks as DDP does."""
    import torch.distributed as dist

    from losskit_segmentation_pidnet import PIDNetLoss

    per = features.shape[0] // world_size
    part = slice(rank * per, (rank + 1) * per)
    result: dict[bool, Any] = {}
    for flag in (True, False):
        model = tiny_heads(classes)
        terms = PIDNetLoss(normalize_across_ranks=flag)(
            split_heads(model(features[part]), classes), {k: v[part] for k, v in target.items()}
        )
        terms.total.backward()
        averaged = {}
        for name, param in model.named_parameters():
            g = param.grad.detach().clone()
            dist.all_reduce(g)
            averaged[name] = g / world_size
        result[flag] = {"grads": averaged, "keys": (tuple(terms), tuple(terms.diagnostics))}
    return result
