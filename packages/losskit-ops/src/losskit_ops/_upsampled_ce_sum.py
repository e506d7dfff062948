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

Like :func:`losskit_ops.upsampled_nll` it produces the full-resolution logits one band of output rows
at a time, but everything happens inside the band:

* The logits are laid out ``(B, h, C, w)`` (rows outermost), so the ``k`` input rows a band of ``n``
  output rows reads are one contiguous block. They are resized along the width into a reused buffer
  (1-D linear resizing: bit for bit the bilinear resize, and faster on CPU), then along the height by
  one ``(n, k) @ (k, C * W)`` product per image (the height interpolation matrix has two non-zeros per
  row, so ``k ~ n h / H + 2``).
* Because the result is a *sum* whose weights are known in forward, the band's gradient
  ``(nll_weight + lse_weight) * softmax - nll_weight * onehot`` is formed while its ``exp`` is still in
  cache, sent back through the transposed height product and the transposed width interpolation (in
  bands of 128 columns), and added into the ``(B, h, C, w)`` gradient of the logits. Backward only
  scales that gradient by the incoming scalar: every band is built and exponentiated once
  (``upsampled_nll`` recomputes each band in backward). With no gradient needed only the value is
  computed.

Bands hold one image and as many rows as fit 2^20 elements on CPU (whole images when they fit), so the
input rows shared by neighbouring bands (about two per band) are resized twice, a few percent extra.
Peak extra memory: the logits' gradient and their ``(B, h, C, w)`` copy, the caller's ``(B, H, W)``
weight maps and one band's buffers: never a ``(B, C, H, W)`` tensor, nor a ``(B, C, h, W)`` one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from losskit.tensors import autocast_off
from losskit_ops._resize import Workspace, add_band, band_budget, band_plan, interp_matrix

__all__ = ["upsampled_ce_sum"]

Plan = list[tuple[int, int, int, int]]

#: Output columns per band of the width adjoint (measured best of 32..256 at 256 -> 1024 on CPU).
_COLUMN_BAND = 128


def _blocks(batch: int, per_row: int, out_h: int, budget: int) -> tuple[int, int]:
    """(images per band, output rows per band): whole images when one fits the budget, else one image
    and as many rows as fit (tall bands read few input rows twice)."""
    per_row = max(per_row, 1)
    if per_row * out_h <= budget:
        return max(1, min(batch, budget // (per_row * out_h))), out_h
    return 1, max(1, budget // per_row)


class _Band:
    """Reused buffers of one band and the width pass and its adjoint on them."""

    def __init__(
        self, like: Tensor, images: int, rows: int, in_rows: int, width: int, align_corners: bool
    ) -> None:
        channels, in_w = like.shape[2], like.shape[3]
        self.in_w, self.width, self.align_corners = in_w, width, align_corners
        per_row = images * channels
        self.col_plan: Plan = []
        cols = 0
        if in_w != width:
            self.col_plan = band_plan(in_w, width, self.align_corners, _COLUMN_BAND)
            cols = max(c1 - c0 for _, _, c0, c1 in self.col_plan)
        self.space = Workspace(
            like,
            (
                per_row * in_rows * width,  # 0: width-resized input rows
                per_row * rows * width,  # 1: resized logits of the band
                per_row * rows * width,  # 2: their exp / gradient
                per_row * in_rows * width,  # 3: gradient of the width-resized input rows
                per_row * in_rows * in_w,  # 4: gradient of the input rows
                per_row * in_rows * cols,  # 5: one column band of it
            ),
        )

    def widen(self, src: Tensor) -> Tensor:
        """``src`` ``(n, k, C, w)`` resized along its last axis to ``(n, k, C, W)``."""
        if self.in_w == self.width:
            return src
        shape = (*src.shape[:-1], self.width)
        out = self.space.view(0, shape)
        # As 1-D "linear" resizing of rows: bit for bit the bilinear resize with C unchanged, faster.
        torch.ops.aten.upsample_linear1d.out(
            src.reshape(-1, 1, self.in_w),
            [self.width],
            self.align_corners,
            None,
            out=out.view(-1, 1, self.width),
        )
        return out

    def narrow(self, grad: Tensor, weights_w: Tensor) -> Tensor:
        """``grad`` ``(n, k, C, W)`` times the width interpolation matrix: ``(n, k, C, w)``."""
        if self.in_w == self.width:
            return grad
        flat = grad.reshape(-1, self.width)
        result = self.space.view(4, (flat.shape[0], self.in_w))
        filled = 0
        for a, b, c0, c1 in self.col_plan:
            part = self.space.view(5, (flat.shape[0], c1 - c0))
            torch.matmul(flat[:, a:b], weights_w[a:b, c0:c1], out=part)
            filled = add_band(result, part, 1, c0, c1, filled)
        if filled < self.in_w:
            result[:, filled:].zero_()
        return result.view(*grad.shape[:-1], self.in_w)


class _UpsampledCESum(torch.autograd.Function):
    """``rows_first`` ``(B, h, C, w)`` (rows outermost) -> the weighted sum, its gradient formed in forward."""

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
        rows = max(b - a for a, b, _, _ in plan)
        in_rows = max(r1 - r0 for _, _, r0, r1 in plan)
        band = _Band(rows_first, images, rows, in_rows, width, align_corners)
        weights_w = interp_matrix(in_w, width, align_corners, rows_first.dtype, rows_first.device)
        grad = torch.empty_like(rows_first) if need_grad else None
        total = rows_first.new_zeros(())
        for b0 in range(0, batch, images):
            b1 = min(batch, b0 + images)
            filled = 0
            for a, b, r0, r1 in plan:
                band_weights = weights[a:b, r0:r1]
                shape = (b1 - b0, b - a, channels, width)
                wide = band.widen(rows_first[b0:b1, r0:r1])  # (n, k, C, W), k input rows
                # one (rows, k) @ (k, C * W) product per image
                up = torch.matmul(band_weights, wide.flatten(2), out=band.space.view(1, shape).flatten(2))
                up = up.view(shape)
                top = up.amax(dim=2, keepdim=True)
                shifted = torch.sub(up, top, out=band.space.view(2, shape)).exp_()
                sumexp = shifted.sum(dim=2)
                lse = sumexp.log().add_(top.squeeze(2))
                lab = labels[b0:b1, a:b].unsqueeze(2)
                w_nll = nll_weight[b0:b1, a:b]
                w_both = w_nll if lse_weight is None else w_nll + lse_weight[b0:b1, a:b]
                # sum of w_nll * (lse - picked) + w_lse * lse, with w_both = w_nll + w_lse
                total += (w_both * lse).sum() - (w_nll * up.gather(2, lab).squeeze(2)).sum()
                if grad is None:
                    continue
                shifted.mul_((w_both / sumexp).unsqueeze(2))  # (w_nll + w_lse) * softmax
                shifted.scatter_add_(2, lab, -w_nll.unsqueeze(2))  # - w_nll * onehot
                back = band.space.view(3, (b1 - b0, r1 - r0, channels, width))
                torch.matmul(band_weights.transpose(0, 1), shifted.flatten(2), out=back.flatten(2))
                filled = add_band(grad[b0:b1], band.narrow(back, weights_w), 1, r0, r1, filled)
            if grad is not None and filled < in_h:
                grad[b0:b1, filled:].zero_()
        if grad is not None:
            ctx.save_for_backward(grad)
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
    images, rows = _blocks(batch, channels * out_w, out_h, budget)
    plan = band_plan(in_h, out_h, align_corners, rows)
    weights = interp_matrix(in_h, out_h, align_corners, dtype, logits.device)
    with autocast_off(logits.device):
        rows_first = logits.transpose(1, 2).contiguous()  # (B, h, C, w)
        result: Tensor = _UpsampledCESum.apply(
            rows_first, labels, nll_weight, lse_weight, weights, plan, images, align_corners
        )
    return result
