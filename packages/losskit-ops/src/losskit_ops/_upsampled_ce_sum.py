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

* The logits are laid out ``(B, h, C, w)`` (rows outermost), so the input rows a band reads are one
  contiguous block. A *slab* of input rows (about 16 bands' worth) of a block of images is resized along
  the width into a reused buffer (1-D linear resizing: bit for bit the bilinear resize, and faster on
  CPU); each band of ``n`` output rows in it is then one ``(n, k) @ (k, C * W)`` product per image (the
  height interpolation matrix has two non-zeros per row, so ``k ~ n h / H + 2``).
* Because the result is a *sum* whose weights are known in forward, the band's gradient
  ``(nll_weight + lse_weight) * softmax - nll_weight * onehot`` is formed while its ``exp`` is still in
  cache and sent back through the transposed height product into the slab's gradient; the slab's
  gradient goes through the transposed width interpolation (bands of 128 columns) into the
  ``(B, h, C, w)`` gradient of the logits. Backward only scales that gradient by the incoming scalar:
  every band is built and exponentiated once (``upsampled_nll`` recomputes each band in backward).
  With no gradient needed only the value is computed.

Bands hold as many images and rows as fit 2^20 elements on CPU (4 MiB of fp32). The input rows
neighbouring slabs share (about two per slab) are resized twice, a few percent extra. Peak extra
memory: the logits' gradient and their ``(B, h, C, w)`` copy, the caller's ``(B, H, W)`` weight maps and
the slab and band buffers: never a ``(B, C, H, W)`` tensor, nor a ``(B, C, h, W)`` one.
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


#: Elements of the width-resized input rows held at once (a slab of rows for a block of images) per
#: band budget: slabs are this many times a band, so a slab's width pass and adjoint are a few large
#: operations shared by many bands.
_SLAB_FACTOR = 16


def _blocks(batch: int, per_row: int, budget: int) -> tuple[int, int]:
    """(images per band, output rows per band) for ``per_row`` elements per image and output row."""
    per_row = max(per_row, 1)
    images = max(1, min(batch, budget // per_row))
    return images, max(1, budget // (images * per_row))


def _slabs(plan: Plan, max_rows: int) -> list[Plan]:
    """Consecutive bands grouped so that each group reads at most ``max_rows`` input rows (at least one
    band per group)."""
    groups: list[Plan] = []
    for band in plan:
        if groups and band[3] - groups[-1][0][2] <= max_rows:
            groups[-1].append(band)
        else:
            groups.append([band])
    return groups


class _Buffers:
    """Reused buffers, and the width pass and its adjoint of a slab of input rows."""

    def __init__(
        self,
        like: Tensor,
        images: int,
        rows: int,
        in_rows: int,
        slab_rows: int,
        width: int,
        align_corners: bool,
    ) -> None:
        channels, in_w = like.shape[2], like.shape[3]
        self.in_w, self.width, self.align_corners = in_w, width, align_corners
        per_row = images * channels
        self.col_plan: Plan = []
        cols = 0
        if in_w != width:
            self.col_plan = band_plan(in_w, width, align_corners, _COLUMN_BAND)
            cols = max(c1 - c0 for _, _, c0, c1 in self.col_plan)
        self.space = Workspace(
            like,
            (
                per_row * slab_rows * width,  # 0: width-resized input rows of the slab
                per_row * rows * width,  # 1: resized logits of a band
                per_row * rows * width,  # 2: their exp / gradient
                per_row * in_rows * width,  # 3: a band's gradient of the width-resized rows
                per_row * slab_rows * width,  # 4: the slab's gradient of the width-resized rows
                per_row * slab_rows * in_w,  # 5: the slab's gradient of the input rows
                per_row * slab_rows * cols,  # 6: one column band of it
            ),
        )

    def widen(self, src: Tensor) -> Tensor:
        """``src`` ``(n, k, C, w)`` resized along its last axis to ``(n, k, C, W)``."""
        if self.in_w == self.width:
            return src
        out = self.space.view(0, (*src.shape[:-1], self.width))
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
        result = self.space.view(5, (flat.shape[0], self.in_w))
        filled = 0
        for a, b, c0, c1 in self.col_plan:
            part = self.space.view(6, (flat.shape[0], c1 - c0))
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
        slabs = _slabs(plan, max(in_rows, _SLAB_FACTOR * rows * in_h // max(labels.shape[1], 1)))
        slab_rows = max(group[-1][3] - group[0][2] for group in slabs)
        buffers = _Buffers(rows_first, images, rows, in_rows, slab_rows, width, align_corners)
        weights_w = interp_matrix(in_w, width, align_corners, rows_first.dtype, rows_first.device)
        grad = torch.empty_like(rows_first) if need_grad else None
        total = rows_first.new_zeros(())
        for b0 in range(0, batch, images):
            b1 = min(batch, b0 + images)
            filled = 0
            for group in slabs:
                s0, s1 = group[0][2], group[-1][3]
                wide = buffers.widen(rows_first[b0:b1, s0:s1])  # (n, k_slab, C, W)
                slab_grad = (
                    buffers.space.view(4, (b1 - b0, s1 - s0, channels, width)) if grad is not None else None
                )
                slab_filled = 0
                for a, b, r0, r1 in group:
                    band_weights = weights[a:b, r0:r1]
                    shape = (b1 - b0, b - a, channels, width)
                    # one (rows, k) @ (k, C * W) product per image: the k input rows are contiguous
                    up = torch.matmul(
                        band_weights,
                        wide[:, r0 - s0 : r1 - s0].flatten(2),
                        out=buffers.space.view(1, shape).flatten(2),
                    ).view(shape)
                    top = up.amax(dim=2, keepdim=True)
                    shifted = torch.sub(up, top, out=buffers.space.view(2, shape)).exp_()
                    sumexp = shifted.sum(dim=2)
                    lse = sumexp.log().add_(top.squeeze(2))
                    lab = labels[b0:b1, a:b].unsqueeze(2)
                    w_nll = nll_weight[b0:b1, a:b]
                    w_both = w_nll if lse_weight is None else w_nll + lse_weight[b0:b1, a:b]
                    # sum of w_nll * (lse - picked) + w_lse * lse, with w_both = w_nll + w_lse
                    total += (w_both * lse).sum() - (w_nll * up.gather(2, lab).squeeze(2)).sum()
                    if slab_grad is None:
                        continue
                    shifted.mul_((w_both / sumexp).unsqueeze(2))  # (w_nll + w_lse) * softmax
                    shifted.scatter_add_(2, lab, -w_nll.unsqueeze(2))  # - w_nll * onehot
                    back = buffers.space.view(3, (b1 - b0, r1 - r0, channels, width))
                    torch.matmul(band_weights.transpose(0, 1), shifted.flatten(2), out=back.flatten(2))
                    slab_filled = add_band(slab_grad, back, 1, r0 - s0, r1 - s0, slab_filled)
                if grad is not None and slab_grad is not None:
                    filled = add_band(grad[b0:b1], buffers.narrow(slab_grad, weights_w), 1, s0, s1, filled)
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
    images, rows = _blocks(batch, channels * out_w, budget)
    plan = band_plan(in_h, out_h, align_corners, rows)
    weights = interp_matrix(in_h, out_h, align_corners, dtype, logits.device)
    with autocast_off(logits.device):
        rows_first = logits.transpose(1, 2).contiguous()  # (B, h, C, w)
        result: Tensor = _UpsampledCESum.apply(
            rows_first, labels, nll_weight, lse_weight, weights, plan, images, align_corners
        )
    return result
