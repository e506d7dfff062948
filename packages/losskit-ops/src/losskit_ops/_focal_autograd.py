# SPDX-License-Identifier: Apache-2.0
"""Autograd functions of the fast sigmoid focal loss (dense targets and class-index targets).

Both save only their inputs (the logits and the given targets) and recompute what the backward needs
chunk by chunk, writing the gradient straight into its output: the peak extra memory is the gradient
itself plus a few cache-sized scratch buffers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from losskit_ops._focal_kernels import NUM_BUFFERS, focal_grad_elements, focal_terms

__all__ = ["FocalDense", "FocalIndexed", "chunk_elements", "compute_dtype"]

#: Elements per chunk on CPU: the five scratch buffers (2 MiB each in fp32) stay in the L2/L3 caches,
#: and chunks are few enough that the per-op fork/join of the intra-op threads stays a small cost
#: (2^18 to 2^20 measured alike on an idle 2-core machine; larger chunks degrade less when the cores
#: are oversubscribed).
CPU_CHUNK = 1 << 19
#: Elements per chunk elsewhere (accelerators): few, large kernels.
DEVICE_CHUNK = 1 << 22


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_elements(device: torch.device) -> int:
    """How many elements one chunk holds on ``device``."""
    return CPU_CHUNK if device.type == "cpu" else DEVICE_CHUNK


def _alpha_weights(alpha: float) -> tuple[float, float]:
    """``(a0, a1)``: the alpha weight of a 0 target and of a 1 target (1 and 1 when disabled)."""
    return (1.0 - alpha, alpha) if alpha >= 0.0 else (1.0, 1.0)


class _Workspace:
    """Scratch buffers for chunks of at most ``size`` elements, plus two casting buffers."""

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.flat = [torch.empty(size, dtype=dtype, device=device) for _ in range(NUM_BUFFERS + 2)]
        self.one = torch.ones((), dtype=dtype, device=device)
        self.dtype = dtype

    def bufs(self, shape: torch.Size) -> list[Tensor]:
        n = shape.numel()
        return [b[:n].view(shape) for b in self.flat[:NUM_BUFFERS]]

    def cast(self, chunk: Tensor, slot: int) -> Tensor:
        """``chunk`` in the compute dtype (a view when it already is, else a copy into a buffer)."""
        if chunk.dtype == self.dtype:
            return chunk
        return self.flat[NUM_BUFFERS + slot][: chunk.numel()].view(chunk.shape).copy_(chunk)


def _total(partials: list[Tensor], device: torch.device) -> Tensor:
    """The sum of per-chunk partial sums, in float64."""
    if not partials:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.stack(partials).sum(dtype=torch.float64)


class FocalDense(torch.autograd.Function):
    """Sigmoid focal loss with a dense target of the logits' shape; gradient w.r.t. the logits only."""

    @staticmethod
    def forward(ctx: Any, pred: Tensor, target: Tensor, alpha: float, gamma: float, reduction: str) -> Tensor:
        cdt = compute_dtype(pred.dtype)
        x = pred.contiguous().view(-1)
        t = target.contiguous().view(-1)
        n = x.numel()
        step = chunk_elements(x.device)
        ws = _Workspace(min(step, max(n, 1)), cdt, x.device)
        a0, a1 = _alpha_weights(alpha)
        ctx.save_for_backward(pred, target)
        ctx.config = (alpha, gamma, reduction)
        if reduction == "none":
            out = torch.empty(n, dtype=cdt, device=x.device)
            c0 = torch.full((), a0, dtype=cdt, device=x.device)
            c1 = torch.full((), a1 - a0, dtype=cdt, device=x.device)
            for start in range(0, n, step):
                xc = ws.cast(x[start : start + step], 0)
                tc = ws.cast(t[start : start + step], 1)
                bufs = ws.bufs(xc.shape)
                f = focal_terms(xc, tc, gamma, bufs, ws.one)
                if alpha >= 0.0:
                    torch.mul(f, torch.addcmul(c0, tc, c1, out=bufs[3]), out=out[start : start + step])
                else:
                    out[start : start + step].copy_(f)
            return out.view(pred.shape)
        # sum(a_t f) = a0 sum(f) + (a1 - a0) dot(t, f): no elementwise pass for the weight
        sums: list[Tensor] = []
        dots: list[Tensor] = []
        for start in range(0, n, step):
            xc = ws.cast(x[start : start + step], 0)
            tc = ws.cast(t[start : start + step], 1)
            f = focal_terms(xc, tc, gamma, ws.bufs(xc.shape), ws.one)
            sums.append(f.sum())
            if alpha >= 0.0:
                dots.append(torch.dot(tc, f))
        total = _total(sums, x.device) * a0
        if alpha >= 0.0:
            total = total + _total(dots, x.device) * (a1 - a0)
        total = total.to(cdt)
        return total / max(n, 1) if reduction == "mean" else total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        pred, target = ctx.saved_tensors
        alpha, gamma, reduction = ctx.config
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        cdt = compute_dtype(pred.dtype)
        x = pred.contiguous().view(-1)
        t = target.contiguous().view(-1)
        n = x.numel()
        grad = torch.empty(n, dtype=pred.dtype, device=pred.device)
        step = chunk_elements(x.device)
        ws = _Workspace(min(step, max(n, 1)), cdt, x.device)
        a0, a1 = _alpha_weights(alpha)
        g_flat: Tensor | None = None
        if reduction == "none":
            g_flat = grad_out.to(cdt).contiguous().view(-1)
            scale = torch.ones((), dtype=cdt, device=x.device)
        else:
            scale = grad_out.to(cdt) / max(n, 1) if reduction == "mean" else grad_out.to(cdt)
        c0 = scale * a0
        c1 = scale * (a1 - a0) if alpha >= 0.0 else None
        for start in range(0, n, step):
            xc = ws.cast(x[start : start + step], 0)
            tc = ws.cast(t[start : start + step], 1)
            g = g_flat[start : start + step] if g_flat is not None else None
            out = grad[start : start + step]
            focal_grad_elements(xc, tc, gamma, ws.bufs(xc.shape), ws.one, c0, c1, out, g)
        return grad.view(pred.shape), None, None, None, None


class FocalIndexed(torch.autograd.Function):
    """Sigmoid focal loss of ``(N, C)`` logits with one-hot targets given as class indices.

    ``labels[i]`` in ``[0, C)`` is the positive class of row ``i``; any other value (``-1``) is an
    all-zero target row. ``weight`` (``(N,)`` or None) multiplies each row's loss. The all-zero
    target's loss is computed densely, then corrected at the ``N`` labelled positions.
    """

    @staticmethod
    def forward(
        ctx: Any,
        pred: Tensor,
        labels: Tensor,
        weight: Tensor | None,
        alpha: float,
        gamma: float,
        reduction: str,
    ) -> Tensor:
        cdt = compute_dtype(pred.dtype)
        x = pred.contiguous()
        n_rows, n_cls = x.shape
        device = x.device
        rows = max(1, chunk_elements(device) // max(n_cls, 1))
        ws = _Workspace(max(1, min(rows, n_rows) * n_cls), cdt, device)
        w = weight.to(cdt) if weight is not None else None
        a0, _ = _alpha_weights(alpha)
        idx, valid, pos_loss, neg_loss = _positions(x, labels, alpha, gamma, cdt, grad=False)
        ctx.save_for_backward(pred, labels, weight)
        ctx.config = (alpha, gamma, reduction)
        ctx.row_loss = None
        if reduction == "none":
            out = torch.empty(n_rows, n_cls, dtype=cdt, device=device)
            for start in range(0, n_rows, rows):
                xc = ws.cast(x[start : start + rows], 0)
                f = focal_terms(xc, None, gamma, ws.bufs(xc.shape), ws.one)
                torch.mul(f, a0, out=out[start : start + rows])
            if n_rows and n_cls:
                out.scatter_(1, idx[:, None], torch.where(valid, pos_loss, neg_loss)[:, None])
            if w is not None:
                out.mul_(w[:, None])
            return out
        row_loss = torch.empty(n_rows, dtype=cdt, device=device)
        for start in range(0, n_rows, rows):
            xc = ws.cast(x[start : start + rows], 0)
            f = focal_terms(xc, None, gamma, ws.bufs(xc.shape), ws.one)
            torch.sum(f, dim=1, out=row_loss[start : start + rows])
        row_loss.mul_(a0)
        if n_cls:
            row_loss.add_(torch.where(valid, pos_loss - neg_loss, 0.0))
        if weight is not None and ctx.needs_input_grad[2]:
            ctx.row_loss = row_loss
        total = torch.dot(row_loss, w) if w is not None else row_loss.sum()
        return total / max(n_rows * n_cls, 1) if reduction == "mean" else total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        pred, labels, weight = ctx.saved_tensors
        alpha, gamma, reduction = ctx.config
        cdt = compute_dtype(pred.dtype)
        x = pred.contiguous()
        n_rows, n_cls = x.shape
        device = x.device
        w = weight.to(cdt) if weight is not None else None
        a0, _ = _alpha_weights(alpha)
        g = grad_out.to(cdt)
        if reduction == "mean":
            g = g / max(n_rows * n_cls, 1)
        grad_pred = grad_weight = None
        if ctx.needs_input_grad[0]:
            rows = max(1, chunk_elements(device) // max(n_cls, 1))
            ws = _Workspace(max(1, min(rows, n_rows) * n_cls), cdt, device)
            grad_pred = torch.empty(n_rows, n_cls, dtype=pred.dtype, device=device)
            # the per-row factor: alpha weight of a 0 target x incoming gradient x row weight
            row_scale = g * a0 if reduction != "none" else torch.full((), a0, dtype=cdt, device=device)
            if w is not None:
                row_scale = (w * row_scale)[:, None]
            for start in range(0, n_rows, rows):
                xc = ws.cast(x[start : start + rows], 0)
                c0 = row_scale[start : start + rows] if row_scale.dim() else row_scale
                g_chunk = g[start : start + rows] if reduction == "none" else None
                out = grad_pred[start : start + rows]
                focal_grad_elements(xc, None, gamma, ws.bufs(xc.shape), ws.one, c0, None, out, g_chunk)
            if n_rows and n_cls:
                idx, valid, pos_grad, neg_grad = _positions(x, labels, alpha, gamma, cdt, grad=True)
                val = torch.where(valid, pos_grad, neg_grad)
                val = val * (g.gather(1, idx[:, None]).squeeze(1) if reduction == "none" else g)
                if w is not None:
                    val = val * w
                grad_pred.scatter_(1, idx[:, None], val[:, None].to(pred.dtype))
        if weight is not None and ctx.needs_input_grad[2]:
            if reduction == "none":
                grad_weight = _rows_dot(x, labels, g, alpha, gamma, cdt).to(weight.dtype)
            else:
                grad_weight = (ctx.row_loss * g).to(weight.dtype)
        return grad_pred, None, grad_weight, None, None, None


def _positions(
    x: Tensor, labels: Tensor, alpha: float, gamma: float, cdt: torch.dtype, *, grad: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """At each row's label position: the column, whether the row has a positive, and the alpha-weighted
    focal loss (or its derivative when ``grad``) with target 1 and with target 0."""
    n_cls = x.shape[1]
    labels = labels.long()
    valid = (labels >= 0) & (labels < n_cls)
    idx = labels.clamp(0, max(n_cls - 1, 0))
    if n_cls == 0:
        empty = x.new_zeros(x.shape[0], dtype=cdt)
        return idx, valid, empty, empty
    xp = x.gather(1, idx[:, None]).squeeze(1).to(cdt)
    one = torch.ones((), dtype=cdt, device=x.device)
    a0, a1 = _alpha_weights(alpha)

    def run(t: Tensor | None, a: float) -> Tensor:
        bufs = [torch.empty_like(xp) for _ in range(NUM_BUFFERS)]
        if not grad:
            return focal_terms(xp, t, gamma, bufs, one).mul_(a)
        out = torch.empty_like(xp)
        focal_grad_elements(xp, t, gamma, bufs, one, torch.full_like(one, a), None, out)
        return out

    return idx, valid, run(torch.ones_like(xp), a1), run(None, a0)


def _rows_dot(x: Tensor, labels: Tensor, g: Tensor, alpha: float, gamma: float, cdt: torch.dtype) -> Tensor:
    """``sum_j g[i, j] * loss[i, j]`` per row (the weight's gradient for ``reduction='none'``)."""
    n_rows, n_cls = x.shape
    rows = max(1, chunk_elements(x.device) // max(n_cls, 1))
    ws = _Workspace(max(1, min(rows, n_rows) * n_cls), cdt, x.device)
    out = torch.empty(n_rows, dtype=cdt, device=x.device)
    a0, _ = _alpha_weights(alpha)
    for start in range(0, n_rows, rows):
        xc = ws.cast(x[start : start + rows], 0)
        f = focal_terms(xc, None, gamma, ws.bufs(xc.shape), ws.one)
        torch.sum(f.mul_(g[start : start + rows]), dim=1, out=out[start : start + rows])
    out.mul_(a0)
    if n_rows and n_cls:
        idx, valid, pos_loss, neg_loss = _positions(x, labels, alpha, gamma, cdt, grad=False)
        g_pos = g.gather(1, idx[:, None]).squeeze(1)
        out.add_(torch.where(valid, pos_loss - neg_loss, 0.0) * g_pos)
    return out
