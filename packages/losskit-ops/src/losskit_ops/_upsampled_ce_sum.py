# SPDX-License-Identifier: Apache-2.0
"""A weighted sum of per-pixel cross-entropies of bilinearly upsampled logits, forward and backward in
one banded pass.

``upsampled_ce_sum(logits, labels, nll_weight, lse_weight)`` is the scalar
``sum_i nll_weight_i * nll_i + lse_weight_i * lse_i`` over the ``(B, H, W)`` pixels of
``up = F.interpolate(logits, labels.shape[-2:], mode="bilinear")``, with ``lse_i = logsumexp_c up_i``
and ``nll_i = lse_i - up_i[label_i]``. A mean cross-entropy is such a sum divided by a count, and the
uniform part of label smoothing, ``-sum_c w_c log p_c = (sum_c w_c) lse - sum_c w_c up_c``, adds the
``lse`` term (its last sum is linear in the logits: the caller resizes ``sum_c w_c logits_c``, one
channel).

It walks the full-resolution logits band by band as :func:`losskit_ops.upsampled_nll` does (width pass
``(B, C, h, w) -> (B, C, h, W)`` in the autograd graph via :func:`resize2d`, height pass as small dense
products into a reused, cache-sized buffer), but because the result is a *sum* with weights known in
forward, each band's gradient ``(nll_weight + lse_weight) * softmax - nll_weight * onehot`` is formed
while the band's ``exp`` is still in cache and sent back through the transposed height pass at once.
Backward then only scales that ``(B, C, h, W)`` gradient by the incoming scalar: every band is built,
exponentiated and reduced once instead of twice (``upsampled_nll`` recomputes it in backward). With no
gradient needed (``torch.no_grad()``, logits that do not require grad) only the value is computed.

Peak extra memory: the width-resized logits and their gradient (``(B, C, h, W)`` each), a few
``(B, H, W)`` maps and one band's buffers; never a ``(B, C, H, W)`` tensor.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from losskit.tensors import autocast_off
from losskit_ops._resize import Workspace, add_band, band_budget, band_plan, interp_matrix
from losskit_ops._upsampled_nll import _blocks

__all__ = ["upsampled_ce_sum"]

Plan = list[tuple[int, int, int, int]]

#: Output columns per band of the width adjoint (measured best of 32..256 at 256 -> 1024 on CPU).
_COLUMN_BAND = 128


def _columns_adjoint(grad: Tensor, in_w: int, align_corners: bool) -> Tensor:
    """``grad @ R_w`` over the last axis: ``(..., W) -> (..., w)``, in bands of output columns."""
    out_w = grad.shape[-1]
    if out_w == in_w:  # the width pass was the identity
        return grad
    weights = interp_matrix(in_w, out_w, align_corners, grad.dtype, grad.device)
    plan = band_plan(in_w, out_w, align_corners, _COLUMN_BAND)
    result = grad.new_empty(*grad.shape[:-1], in_w)
    flat = grad.reshape(-1, out_w)
    space = Workspace(grad, (flat.shape[0] * max(c1 - c0 for _, _, c0, c1 in plan),))
    filled = 0
    for a, b, c0, c1 in plan:
        back = space.view(0, (flat.shape[0], c1 - c0))
        torch.matmul(flat[:, a:b], weights[a:b, c0:c1], out=back)
        filled = add_band(result.view(-1, in_w), back, 1, c0, c1, filled)
    if filled < in_w:
        result[..., filled:].zero_()
    return result


class _UpsampledCESum(torch.autograd.Function):
    """``wide`` ``(B, h, C, W)`` (rows outermost) -> the weighted sum, with its gradient computed in forward."""

    @staticmethod
    def forward(
        ctx: Any,
        rows_first: Tensor,
        labels: Tensor,
        nll_weight: Tensor,
        lse_weight: Tensor | None,
        weights: Tensor,
        plan: Plan,
        images: int,
        align_corners: bool,
    ) -> Tensor:
        need_grad = bool(ctx.needs_input_grad[0])
        batch, in_h, channels, in_w = rows_first.shape
        width = labels.shape[-1]
        # Width pass on the (B, h, C, w) layout, so that the rows a band reads are one contiguous block.
        # As 1-D "linear" resizing of rows: equal, bit for bit, to the bilinear resize with C unchanged,
        # and faster on CPU.
        wide = F.interpolate(
            rows_first.view(-1, 1, in_w), size=width, mode="linear", align_corners=align_corners
        ).view(batch, in_h, channels, width)
        rows = max(b - a for a, b, _, _ in plan)
        in_rows = max(r1 - r0 for _, _, r0, r1 in plan)
        size = images * channels * width
        space = Workspace(wide, (size * rows, size * rows, size * in_rows if need_grad else 0))
        grad_wide = torch.empty_like(wide) if need_grad else None
        total = wide.new_zeros(())
        for b0 in range(0, batch, images):
            b1 = min(batch, b0 + images)
            filled = 0
            for a, b, r0, r1 in plan:
                band_weights = weights[a:b, r0:r1]
                shape = (b1 - b0, b - a, channels, width)
                # one (n, k) @ (k, C * W) product per image: the k input rows are contiguous
                up = torch.matmul(
                    band_weights, wide[b0:b1, r0:r1].flatten(2), out=space.view(0, shape).flatten(2)
                ).view(shape)
                top = up.amax(dim=2, keepdim=True)
                shifted = torch.sub(up, top, out=space.view(1, shape)).exp_()
                sumexp = shifted.sum(dim=2)
                lse = sumexp.log().add_(top.squeeze(2))
                lab = labels[b0:b1, a:b].unsqueeze(2)
                w_nll = nll_weight[b0:b1, a:b]
                w_both = w_nll if lse_weight is None else w_nll + lse_weight[b0:b1, a:b]
                # sum of w_nll * (lse - picked) + w_lse * lse, with w_both = w_nll + w_lse
                total += (w_both * lse).sum() - (w_nll * up.gather(2, lab).squeeze(2)).sum()
                if grad_wide is None:
                    continue
                shifted.mul_((w_both / sumexp).unsqueeze(2))  # (w_nll + w_lse) * softmax
                shifted.scatter_add_(2, lab, -w_nll.unsqueeze(2))  # - w_nll * onehot
                back = space.view(2, (b1 - b0, r1 - r0, channels, width))
                torch.matmul(band_weights.transpose(0, 1), shifted.flatten(2), out=back.flatten(2))
                filled = add_band(grad_wide[b0:b1], back, 1, r0, r1, filled)
            if grad_wide is not None and filled < in_h:
                grad_wide[b0:b1, filled:].zero_()
        if grad_wide is not None:
            del wide, space
            ctx.save_for_backward(_columns_adjoint(grad_wide, in_w, align_corners))
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (grad_rows_first,) = ctx.saved_tensors
        return grad_rows_first * grad.to(grad_rows_first.dtype), None, None, None, None, None, None, None


def upsampled_ce_sum(
    logits: Tensor,
    labels: Tensor,
    nll_weight: Tensor,
    lse_weight: Tensor | None = None,
    *,
    align_corners: bool = True,
    band_elements: int | None = None,
) -> Tensor:
    """``sum_i nll_weight_i * nll_i + lse_weight_i * lse_i`` over the pixels of the resized logits.

    Args:
        logits: ``(B, C, h, w)`` floating logits (computed in their own dtype; pass fp32 or fp64).
        labels: ``(B, H, W)`` int64 class indices, in ``[0, C)`` everywhere (give pixels that do not
            count any such label, e.g. 0, and weight 0).
        nll_weight: ``(B, H, W)`` weight of each pixel's cross-entropy ``nll_i = lse_i - up_i[label_i]``
            (0 for pixels that do not count); not differentiated.
        lse_weight: ``(B, H, W)`` weight of each pixel's ``lse_i = logsumexp_c up_i``, or None for 0;
            not differentiated.
        align_corners: as in ``F.interpolate(mode="bilinear")``.
        band_elements: elements per band buffer (default: by device, see ``_resize.band_budget``).

    Returns:
        A 0-dim tensor in ``logits``' dtype, differentiable with respect to ``logits`` (first order).
    """
    batch, channels, in_h, _ = logits.shape
    out_h, out_w = labels.shape[-2:]
    if batch * out_h * out_w == 0:
        return logits.reshape(-1)[:0].sum()
    dtype = logits.dtype
    nll_weight = nll_weight.to(dtype)
    lse_weight = None if lse_weight is None else lse_weight.to(dtype)
    budget = band_elements if band_elements is not None else band_budget(logits.device)
    images, rows = _blocks(batch, channels * out_w, budget)
    plan = band_plan(in_h, out_h, align_corners, rows)
    weights = interp_matrix(in_h, out_h, align_corners, dtype, logits.device)
    with autocast_off(logits.device):
        rows_first = logits.transpose(1, 2).contiguous()  # (B, h, C, w)
        result: Tensor = _UpsampledCESum.apply(
            rows_first, labels, nll_weight, lse_weight, weights, plan, images, align_corners
        )
    return result
