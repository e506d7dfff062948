# SPDX-License-Identifier: Apache-2.0
"""Bilinear resizing as banded interpolation matrices, with a fast adjoint for CPU.

Bilinear interpolation (as ``F.interpolate(mode="bilinear")``) is separable: along one axis it is a
matrix ``R`` of shape ``(out, in)`` with at most two non-zeros per row, and the input indices grow with
the output index. A band of ``n`` consecutive outputs reads ``k ~ n * in / out + 2`` consecutive inputs,
so applying ``R`` (or its transpose) band by band is a handful of small dense products.

:func:`resize2d` resizes with ``F.interpolate`` but runs its backward as those banded products: on CPU,
``upsample_bilinear2d_backward`` scatters pixel by pixel and costs several times more.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from losskit.tensors import autocast_off

__all__ = ["Workspace", "add_band", "band_budget", "band_plan", "interp_matrix", "resize2d"]

#: Elements of one band's buffer: 4 MiB of fp32 on CPU (cache-sized: measured best among 2**18 .. 2**23
#: on the benchmark case); larger on accelerators, where each band costs kernel launches.
_BAND_ELEMENTS = {"cpu": 1 << 20}
_BAND_ELEMENTS_DEFAULT = 1 << 24
#: Output columns per band of the width adjoint.
_COLUMN_BAND = 256


def band_budget(device: torch.device) -> int:
    """How many elements one band's buffer may hold on ``device``."""
    return _BAND_ELEMENTS.get(device.type, _BAND_ELEMENTS_DEFAULT)


@functools.lru_cache(maxsize=64)
def _interp(
    in_size: int, out_size: int, align_corners: bool
) -> tuple[Tensor, tuple[int, ...], tuple[int, ...]]:
    """``R`` (float64 CPU, ``(out_size, in_size)``) and the first/last input index of each output.

    The source positions are computed in Python floats (the float64 arithmetic torch's kernel does,
    in the same order), so the indices are plain ints: nothing is read back from a tensor, which keeps
    the band bounds static under ``torch.compile``.
    """
    if align_corners:
        scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        src = [d * scale for d in range(out_size)]
    else:
        ratio = in_size / out_size
        src = [max((d + 0.5) * ratio - 0.5, 0.0) for d in range(out_size)]
    lo = [min(math.floor(v), in_size - 1) for v in src]
    hi = [min(i + 1, in_size - 1) for i in lo]
    lam = torch.tensor([min(max(v - i, 0.0), 1.0) for v, i in zip(src, lo)], dtype=torch.float64)
    index = torch.arange(out_size)
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    weights.index_put_((index, torch.tensor(lo, dtype=torch.int64)), 1.0 - lam, accumulate=True)
    weights.index_put_((index, torch.tensor(hi, dtype=torch.int64)), lam, accumulate=True)
    return weights, tuple(lo), tuple(hi)


@functools.lru_cache(maxsize=64)
def interp_matrix(
    in_size: int, out_size: int, align_corners: bool, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """The ``(out_size, in_size)`` bilinear interpolation matrix of one axis (cached per device)."""
    # The CPU source stays alive in the cache above, so the copy need not block the host.
    source = _interp(in_size, out_size, align_corners)[0].to(dtype=dtype)
    return source.to(device=device, non_blocking=True)


def band_plan(
    in_size: int, out_size: int, align_corners: bool, per_band: int
) -> list[tuple[int, int, int, int]]:
    """Bands ``(out_start, out_stop, in_start, in_stop)``: ``per_band`` outputs and the inputs they read."""
    _, lo, hi = _interp(in_size, out_size, align_corners)
    plan = []
    for start in range(0, out_size, per_band):
        stop = min(out_size, start + per_band)
        plan.append((start, stop, lo[start], hi[stop - 1] + 1))
    return plan


class Workspace:
    """Flat buffers reused by every band, viewed at the band's shape.

    A fresh multi-MiB tensor per band would be handed back to the OS and faulted in again, page by
    page, on the next band: on a CPU that costs more than the arithmetic.
    """

    def __init__(self, like: Tensor, sizes: tuple[int, ...]) -> None:
        self.flat = [like.new_empty(size) for size in sizes]

    def view(self, slot: int, shape: tuple[int, ...]) -> Tensor:
        numel = 1
        for s in shape:
            numel *= s
        return self.flat[slot][:numel].view(shape)


def add_band(dst: Tensor, src: Tensor, dim: int, start: int, stop: int, filled: int) -> int:
    """``dst[start:stop] += src`` along ``dim``, where only indices below ``filled`` hold data so far.

    Bands are visited in order and the inputs they touch only move forward, so indices past ``filled``
    are written (copied) rather than added: the result needs no zero fill. Returns the new ``filled``.
    """
    if start > filled:  # inputs no band reads (only when downsampling)
        dst.narrow(dim, filled, start - filled).zero_()
        filled = start
    overlap = max(0, min(filled, stop) - start)
    if overlap:
        dst.narrow(dim, start, overlap).add_(src.narrow(dim, 0, overlap))
    if start + overlap < stop:
        dst.narrow(dim, start + overlap, stop - start - overlap).copy_(
            src.narrow(dim, overlap, stop - start - overlap)
        )
    return max(filled, stop)


def _rows_adjoint(grad: Tensor, in_h: int, align_corners: bool, band_elements: int | None) -> Tensor:
    """``R_h^T @ grad`` over the height axis: ``(N, C, H, W) -> (N, C, h, W)``."""
    n, c, out_h, width = grad.shape
    budget = band_budget(grad.device) if band_elements is None else band_elements
    rows_per_band = max(1, budget // max(1, n * c * width))
    weights = interp_matrix(in_h, out_h, align_corners, grad.dtype, grad.device)
    plan = band_plan(in_h, out_h, align_corners, rows_per_band)
    result = grad.new_empty(n, c, in_h, width)
    space = Workspace(grad, (n * c * max(r1 - r0 for _, _, r0, r1 in plan) * width,))
    filled = 0
    for a, b, r0, r1 in plan:
        back = space.view(0, (n, c, r1 - r0, width))
        torch.matmul(weights[a:b, r0:r1].transpose(0, 1), grad[:, :, a:b], out=back)
        filled = add_band(result, back, 2, r0, r1, filled)
    if filled < in_h:
        result[:, :, filled:].zero_()
    return result


def _columns_adjoint(grad: Tensor, in_w: int, align_corners: bool) -> Tensor:
    """``grad @ R_w`` over the width axis: ``(N, C, h, W) -> (N, C, h, w)``."""
    n, c, h, out_w = grad.shape
    weights = interp_matrix(in_w, out_w, align_corners, grad.dtype, grad.device)
    plan = band_plan(in_w, out_w, align_corners, _COLUMN_BAND)
    result = grad.new_empty(n, c, h, in_w)
    space = Workspace(grad, (n * c * h * max(c1 - c0 for _, _, c0, c1 in plan),))
    filled = 0
    for a, b, c0, c1 in plan:
        back = space.view(0, (n, c, h, c1 - c0))
        torch.matmul(grad[..., a:b], weights[a:b, c0:c1], out=back)
        filled = add_band(result, back, 3, c0, c1, filled)
    if filled < in_w:
        result[..., filled:].zero_()
    return result


class _Resize2d(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, size: tuple[int, int], align_corners: bool, band_elements: int | None
    ) -> Tensor:
        ctx.in_size = tuple(x.shape[-2:])
        ctx.align_corners = align_corners
        ctx.band_elements = band_elements
        return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        in_h, in_w = ctx.in_size
        with autocast_off(grad.device.type):
            grad = grad.contiguous()
            if grad.shape[2] != in_h:
                grad = _rows_adjoint(grad, in_h, ctx.align_corners, ctx.band_elements)
            if grad.shape[3] != in_w:
                grad = _columns_adjoint(grad, in_w, ctx.align_corners)
        return grad, None, None, None


def resize2d(
    x: Tensor, size: tuple[int, int], *, align_corners: bool, band_elements: int | None = None
) -> Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=...)`` with a banded-matrix backward.

    Args:
        x: ``(N, C, h, w)`` floating tensor.
        size: output ``(H, W)``.
        align_corners: as in ``F.interpolate``.
        band_elements: elements per band of the height adjoint (default: :func:`band_budget`).
    """
    result: Tensor = _Resize2d.apply(x, tuple(size), align_corners, band_elements)
    return result
