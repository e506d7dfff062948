# SPDX-License-Identifier: Apache-2.0
"""Per-pixel cross-entropy of bilinearly upsampled logits, without keeping the upsampled logits.

``upsampled_nll(logits, labels, valid)`` equals
``F.cross_entropy(F.interpolate(logits, labels.shape[-2:], mode="bilinear", align_corners=...), labels,
reduction="none")`` (with 0 where ``valid`` is false), computed in a way that suits the loss of a
segmentation network whose heads run at 1/8 of the label resolution:

* Bilinear interpolation is separable. The width pass (``(B, C, h, w) -> (B, C, h, W)``, 8x smaller than
  the full-resolution logits) is :func:`._resize.resize2d` in the autograd graph. The height pass is a
  small dense matrix ``R`` of shape ``(H, h)`` with two non-zeros per row; a band of ``n`` output rows
  needs only ``k ~ n * h / H + 2`` input rows, so it is one batched ``(n, k) @ (k, W)`` product.
* The full-resolution logits are produced one band of rows at a time (a few MiB, cache-resident on a
  CPU), reduced to the per-pixel log-sum-exp and the logit of the label, and dropped. Only the
  ``(B, H, W)`` log-sum-exp is kept for backward.
* Backward recomputes each band, turns it into ``(softmax - onehot) * grad`` in place and applies the
  transpose of the height pass; autograd then applies the transpose of the width pass.

So no ``(B, C, H, W)`` tensor is ever alive as a whole: peak extra memory is the ``(B, C, h, W)``
width-interpolated logits, their gradient, a few ``(B, H, W)`` maps and one band's temporaries.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from losskit.tensors import autocast_off
from losskit_ops._resize import (
    Workspace,
    add_band,
    band_budget,
    band_plan,
    interp_matrix,
    resize2d,
)

__all__ = ["upsampled_nll"]


def _blocks(batch: int, per_item: int, budget: int) -> tuple[int, int]:
    """(images per band, output rows per band) for ``per_item`` elements per image and output row."""
    per_item = max(per_item, 1)
    images = max(1, min(batch, budget // per_item))
    rows = max(1, budget // (images * per_item))
    return images, rows


class _UpsampledNLL(torch.autograd.Function):
    """``wide`` ``(B, C, h, W)`` -> per-pixel NLL ``(B, H, W)`` of the height-upsampled logits."""

    @staticmethod
    def forward(
        ctx: Any,
        wide: Tensor,
        labels: Tensor,
        valid: Tensor,
        weights: Tensor,
        plan: list[tuple[int, int, int, int]],
        images: int,
    ) -> Tensor:
        batch, channels, _, width = wide.shape
        out_h = labels.shape[1]
        nll = wide.new_empty(batch, out_h, width)
        lse = wide.new_empty(batch, out_h, width)
        rows = max(b - a for a, b, _, _ in plan)
        space = Workspace(wide, (images * channels * rows * width,) * 2)
        for b0 in range(0, batch, images):
            b1 = min(batch, b0 + images)
            for a, b, r0, r1 in plan:
                shape = (b1 - b0, channels, b - a, width)
                up = torch.matmul(weights[a:b, r0:r1], wide[b0:b1, :, r0:r1], out=space.view(0, shape))
                top = up.amax(dim=1, keepdim=True)
                shifted = torch.sub(up, top, out=space.view(1, shape)).exp_()
                band_lse = shifted.sum(dim=1).log_().add_(top.squeeze(1))
                lse[b0:b1, a:b] = band_lse
                picked = up.gather(1, labels[b0:b1, None, a:b]).squeeze(1)
                nll[b0:b1, a:b] = torch.where(valid[b0:b1, a:b], band_lse.sub_(picked), 0.0)
        ctx.save_for_backward(wide, labels, valid, weights, lse)
        ctx.plan = plan
        ctx.images = images
        return nll

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        wide, labels, valid, weights, lse = ctx.saved_tensors
        with autocast_off(wide.device.type):  # backward may run inside the caller's autocast region
            return _backward(ctx, grad, wide, labels, valid, weights, lse)


def _backward(
    ctx: Any, grad: Tensor, wide: Tensor, labels: Tensor, valid: Tensor, weights: Tensor, lse: Tensor
) -> tuple[Tensor | None, ...]:
    batch, channels, in_h, width = wide.shape
    grad_wide = torch.empty_like(wide)
    grad = grad.to(wide.dtype)
    rows = max(b - a for a, b, _, _ in ctx.plan)
    in_rows = max(r1 - r0 for _, _, r0, r1 in ctx.plan)
    space = Workspace(wide, (ctx.images * channels * rows * width, ctx.images * channels * in_rows * width))
    for b0 in range(0, batch, ctx.images):
        b1 = min(batch, b0 + ctx.images)
        filled = 0
        for a, b, r0, r1 in ctx.plan:
            band_weights = weights[a:b, r0:r1]
            g = torch.where(valid[b0:b1, None, a:b], grad[b0:b1, None, a:b], 0.0)  # ignored pixels: none
            up = space.view(0, (b1 - b0, channels, b - a, width))
            torch.matmul(band_weights, wide[b0:b1, :, r0:r1], out=up)
            up.sub_(lse[b0:b1, None, a:b]).exp_().mul_(g)  # softmax * grad
            up.scatter_add_(1, labels[b0:b1, None, a:b], -g)  # - onehot * grad
            back = space.view(1, (b1 - b0, channels, r1 - r0, width))
            torch.matmul(band_weights.transpose(0, 1), up, out=back)
            filled = add_band(grad_wide[b0:b1], back, 2, r0, r1, filled)
        if filled < in_h:
            grad_wide[b0:b1, :, filled:].zero_()
    return grad_wide, None, None, None, None, None


def upsampled_nll(
    logits: Tensor,
    labels: Tensor,
    valid: Tensor,
    *,
    align_corners: bool = True,
    band_elements: int | None = None,
) -> Tensor:
    """Per-pixel cross-entropy of ``logits`` bilinearly resized to the labels' size.

    Args:
        logits: ``(B, C, h, w)`` floating logits (computed in their own dtype; pass fp32 or fp64).
        labels: ``(B, H, W)`` int64 class indices; must lie in ``[0, C)`` wherever ``valid`` is true
            (any value in ``[0, C)`` elsewhere, e.g. 0).
        valid: ``(B, H, W)`` bool mask of the pixels that count.
        align_corners: as in ``F.interpolate(mode="bilinear")``.
        band_elements: elements per band buffer (default: by device, see ``_resize.band_budget``).

    Returns:
        ``(B, H, W)``: ``logsumexp_c up(logits)[:, c] - up(logits)[:, label]`` where ``valid``, else 0.
        Differentiable with respect to ``logits`` (first order).
    """
    batch, channels, in_h, _ = logits.shape
    out_h, out_w = labels.shape[-2:]
    if batch * out_h * out_w == 0:
        return logits.new_zeros(batch, out_h, out_w) + logits.reshape(-1)[:0].sum()
    budget = band_elements if band_elements is not None else band_budget(logits.device)
    images, rows = _blocks(batch, channels * out_w, budget)
    plan = band_plan(in_h, out_h, align_corners, rows)
    weights = interp_matrix(in_h, out_h, align_corners, logits.dtype, logits.device)
    with autocast_off(logits.device):
        wide = resize2d(logits, (in_h, out_w), align_corners=align_corners, band_elements=band_elements)
        result: Tensor = _UpsampledNLL.apply(wide, labels, valid, weights, plan, images)
    return result
