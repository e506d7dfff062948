# SPDX-License-Identifier: Apache-2.0
"""Chunked, allocation-free elementwise kernels of the sigmoid focal loss and its gradient.

Every function here works on one *chunk* (a contiguous tensor small enough to stay in cache) and
writes into caller-provided scratch buffers of the chunk's shape, with in-place ops only, so a pass
over a large tensor never allocates a full-size temporary. The math uses only primitives that are
vectorised on CPU (``sigmoid``, ``log``, ``minimum``/``maximum``, ``mul``/``add``/``div``, ``addcmul``);
``log1p``, ``softplus`` and ``binary_cross_entropy_with_logits`` are avoided because they are scalar
loops on CPU builds. Each op is one pass (and, on CPU, one fork/join of the intra-op threads), so the
op count is kept low.

Notation (elementwise, ``x`` the logit, ``t`` the target in [0, 1]):

* ``p = sigmoid(x)``, ``p' = 1 - p = sigmoid(-x)``: both computed directly, exact in both tails;
* ``q = min(p, p') = sigmoid(-|x|)``, ``v = max(p, p') ~ 1 - q``;
* ``L = log(1 + exp(-|x|)) = -log(1 - q)``, so ``softplus(x) = relu(x) + L``;
* ``ce = relu(x) - x t + L`` (binary cross-entropy with logits);
* ``A = p (1 - t)``, ``B = p' t``; ``m = 1 - p_t = A + B`` and ``p - t = A - B``;
* the *unweighted* term ``f = m^gamma ce`` and its derivative
  ``df/dx = m^(gamma - 1) [gamma (1 - 2t) p p' ce + m (A - B)]``.

The alpha weight ``a_t = (1 - alpha) + (2 alpha - 1) t`` is applied by the callers (for a sum it is
``(1 - alpha) sum(f) + (2 alpha - 1) dot(t, f)``, no elementwise pass). ``t=None`` means an all-zero
target, where ``m = p`` and the formulas simplify.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["NUM_BUFFERS", "focal_grad_elements", "focal_terms", "mul_pow_"]

#: Scratch buffers (of the chunk's shape) the kernels need.
NUM_BUFFERS = 5


def _probabilities(x: Tensor, bufs: list[Tensor]) -> None:
    """``bufs[0:4] = p, 1 - p, q, v`` (see the module notation)."""
    p, pm, q, v = bufs[:4]
    torch.sigmoid(x, out=p)
    torch.neg(x, out=pm).sigmoid_()
    torch.minimum(p, pm, out=q)
    torch.maximum(p, pm, out=v)


def _log1p_exp_neg_abs(q: Tensor, v: Tensor, out: Tensor, one: Tensor) -> None:
    """``out = log(1 + exp(-|x|)) = -log(1 - q)``; ``v`` (~ ``1 - q``) is overwritten.

    ``-log(v)`` alone loses what rounding took from ``q`` in ``v``; adding back
    ``(q - (1 - v)) / v`` (``1 - v`` is exact for ``v`` in [0.5, 1]) restores full relative precision
    for tiny ``q`` (``log(1 + exp(-40))`` is 4.2e-18, not 0, in fp32).
    """
    torch.sub(one, v, out=out)
    torch.sub(q, out, out=out)  # q - (1 - v)
    out.div_(v)
    v.log_()
    out.sub_(v)


def mul_pow_(target: Tensor, m: Tensor, exponent: float, tmp: Tensor) -> Tensor:
    """``target *= m ** exponent`` in place, for ``exponent >= 0`` (small integers by multiplication).

    ``m`` may be modified (it is for non-integer exponents).
    """
    if exponent == 0.0:
        return target
    if exponent in (1.0, 2.0, 3.0):
        for _ in range(int(exponent)):
            target.mul_(m)
        return target
    if exponent == 4.0:
        torch.mul(m, m, out=tmp)
        return target.mul_(tmp).mul_(tmp)
    return target.mul_(torch.pow(m, exponent, out=tmp))


def _mul_pow_grad_base_(target: Tensor, m: Tensor, gamma: float, tmp: Tensor) -> Tensor:
    """``target *= m ** (gamma - 1)`` for ``gamma > 0``; ``m`` may be modified.

    For ``gamma < 1`` the factor is taken at ``max(m, tiny)``: where ``m`` underflows to 0 the
    bracket it multiplies is 0 too, and the clamp gives that limit (0) instead of ``inf * 0``.
    """
    exponent = gamma - 1.0
    if exponent < 0.0:
        m.clamp_min_(torch.finfo(m.dtype).tiny)
        return target.mul_(m.pow_(exponent))
    return mul_pow_(target, m, exponent, tmp)


def _cross_entropy(x: Tensor, t: Tensor | None, tail: Tensor, out: Tensor) -> Tensor:
    """``out = relu(x) - x t + tail`` (``tail = log(1 + exp(-|x|))``)."""
    torch.clamp_min(x, 0.0, out=out)
    if t is not None:
        out.addcmul_(x, t, value=-1.0)
    return out.add_(tail)


def focal_terms(x: Tensor, t: Tensor | None, gamma: float, bufs: list[Tensor], one: Tensor) -> Tensor:
    """The unweighted focal term ``m^gamma ce`` of the chunk ``x`` (``t=None``: all-zero target).

    Returns ``bufs[2]``; ``bufs[3]`` and ``bufs[4]`` are free for the caller afterwards.
    """
    p, pm, q, v, tail = bufs[:5]
    _probabilities(x, bufs)
    _log1p_exp_neg_abs(q, v, tail, one)
    ce = _cross_entropy(x, t, tail, out=q)
    if gamma != 0.0:
        if t is not None:
            pm.mul_(t)  # B
            p.addcmul_(p, t, value=-1.0)  # A
            p.add_(pm)  # m
        mul_pow_(ce, p, gamma, tmp=v)
    return ce


def focal_grad_elements(
    x: Tensor,
    t: Tensor | None,
    gamma: float,
    bufs: list[Tensor],
    one: Tensor,
    c0: Tensor,
    c1: Tensor | None,
    out: Tensor,
    g: Tensor | None = None,
) -> None:
    """``out = (c0 + c1 t) * g * d(m^gamma ce)/dx`` for the chunk ``x``.

    ``c0``/``c1`` carry the alpha weight times the incoming gradient and any row weight (0-dim tensors or
    per-row columns); ``c1=None`` means the weight ``c0`` alone. ``g`` is an elementwise incoming
    gradient (``reduction="none"``), or None. ``out`` may have another floating dtype (it is cast).
    """
    p, pm, q, v, w = bufs[:5]
    _probabilities(x, bufs)
    if gamma == 0.0:  # d ce/dx = p - t = A - B
        d = p
        if t is not None:
            pm.mul_(t)
            p.addcmul_(p, t, value=-1.0)
            p.sub_(pm)
    else:
        _log1p_exp_neg_abs(q, v, w, one)  # w = L
        torch.mul(p, pm, out=q)  # s = p (1 - p)
        q.mul_(_cross_entropy(x, t, w, out=v))  # s ce
        d = q
        if t is None:  # m = p, (1 - 2t) = 1, A - B = p: p^(gamma-1) [gamma s ce + p^2]
            if gamma != 1.0:
                d.mul_(gamma)
            d.addcmul_(p, p)
        else:
            pm.mul_(t)  # B
            p.addcmul_(p, t, value=-1.0)  # A
            torch.sub(p, pm, out=w)  # p - t
            p.add_(pm)  # m
            w.mul_(p)  # m (p - t)
            torch.mul(t, -2.0 * gamma, out=v).add_(gamma)  # gamma (1 - 2t)
            d.mul_(v).add_(w)
        if gamma != 1.0:
            _mul_pow_grad_base_(d, p, gamma, tmp=pm)
    if g is not None:
        d.mul_(g)
    if c1 is not None and t is not None:
        torch.mul(d, torch.addcmul(c0, t, c1, out=v), out=out)
    else:
        torch.mul(d, c0, out=out)
