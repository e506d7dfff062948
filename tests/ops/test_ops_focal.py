# SPDX-License-Identifier: Apache-2.0
"""The fast sigmoid focal kernels of losskit-ops against torchvision.ops.sigmoid_focal_loss."""

from __future__ import annotations

import pytest
import torch
import torchvision

import losskit
from losskit_ops import (
    _focal_autograd,
    sigmoid_focal_loss,
    sigmoid_focal_loss_indexed,
    sigmoid_focal_loss_reference,
)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(max |b|, tiny), in float64."""
    a64, b64 = a.detach().double(), b.detach().double()
    if a64.numel() == 0:
        return 0.0
    return float((a64 - b64).abs().max() / b64.abs().max().clamp_min(1e-30))


tv_focal = torchvision.ops.sigmoid_focal_loss

ALPHAS = (0.25, 0.0, 0.5, 1.0, -1.0)
GAMMAS = (0.0, 0.5, 1.0, 2.0, 3.5)


def _inputs(shape, dtype=torch.float32, soft=False, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    if soft:
        t = torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)
    else:
        t = (torch.rand(shape, generator=g) < 0.3).to(dtype)
    return x, t


def _value_and_grad(fn, x, *args, weights=None, **kw):
    x = x.detach().clone().requires_grad_()
    out = fn(x, *args, **kw)
    w = weights if weights is not None else torch.ones_like(out)
    (grad,) = torch.autograd.grad((out * w.to(out.dtype)).sum(), x)
    return out.detach(), grad


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 96 elements, so small tensors exercise the multi-chunk paths."""
    monkeypatch.setattr(_focal_autograd, "CPU_CHUNK", 96)


# -- parity with torchvision ------------------------------------------------------------------


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("soft", [False, True])
def test_dense_matches_torchvision_fp32(alpha, gamma, soft, small_chunks):
    x, t = _inputs((67, 9), soft=soft, seed=int(gamma * 10) + int(alpha * 100))
    for reduction in ("mean", "sum", "none"):
        wts = torch.rand(x.shape) if reduction == "none" else None
        v_ref, g_ref = _value_and_grad(
            tv_focal, x, t, alpha=alpha, gamma=gamma, reduction=reduction, weights=wts
        )
        v, g = _value_and_grad(
            sigmoid_focal_loss, x, t, alpha=alpha, gamma=gamma, reduction=reduction, weights=wts
        )
        assert v.dtype == torch.float32 and g.dtype == torch.float32
        assert rel_diff(v, v_ref) <= 1e-6, (reduction, rel_diff(v, v_ref))
        assert rel_diff(g, g_ref) <= 1e-5, (reduction, rel_diff(g, g_ref))


@pytest.mark.parametrize("gamma", [*GAMMAS, 3.0, 4.0, 5.0])
def test_dense_matches_torchvision_fp64(gamma):
    x, t = _inputs((40, 7), dtype=torch.float64, soft=True, seed=3)
    v_ref, g_ref = _value_and_grad(tv_focal, x, t, gamma=gamma, reduction="mean")
    v, g = _value_and_grad(sigmoid_focal_loss, x, t, gamma=gamma, reduction="mean")
    assert v.dtype == torch.float64
    assert rel_diff(v, v_ref) <= 1e-13 and rel_diff(g, g_ref) <= 1e-12


@pytest.mark.parametrize("shape", [(5,), (3, 4, 5), (2, 3, 4, 5), (1, 1), (300, 2)])
def test_shapes(shape, small_chunks):
    x, t = _inputs(shape, soft=True)
    v_ref, g_ref = _value_and_grad(tv_focal, x, t, reduction="mean")
    v, g = _value_and_grad(sigmoid_focal_loss, x, t, reduction="mean")
    assert v.shape == () and g.shape == shape
    assert rel_diff(v, v_ref) <= 1e-6 and rel_diff(g, g_ref) <= 1e-5


def test_large_tensor_default_chunking():
    x, t = _inputs((6000, 100), seed=5)  # 600000 elements: more than one default CPU chunk (2^19)
    v_ref, g_ref = _value_and_grad(tv_focal, x, t, reduction="mean")
    v, g = _value_and_grad(sigmoid_focal_loss, x, t, reduction="mean")
    assert rel_diff(v, v_ref) <= 1e-6 and rel_diff(g, g_ref) <= 1e-5


def _precise_focal64(x, t, gamma, alpha=0.25):
    ce = (x.clamp_min(0) - x * t) + torch.log1p(torch.exp(-x.abs()))
    m = torch.sigmoid(x) * (1 - t) + torch.sigmoid(-x) * t
    return (alpha * t + (1 - alpha) * (1 - t)) * m**gamma * ce


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_extreme_logits_are_finite_and_accurate(gamma):
    # no 0: |x| in the reference has no derivative there
    x = torch.tensor([-1e4, -100.0, -30.0, -5.0, 0.25, 5.0, 30.0, 100.0, 1e4]).repeat(3)
    t = torch.cat([torch.zeros(9), torch.ones(9), torch.full((9,), 0.3)])
    v, g = _value_and_grad(sigmoid_focal_loss, x, t, gamma=gamma, reduction="none")
    assert torch.isfinite(v).all() and torch.isfinite(g).all()
    # against a float64 computation with log1p-accurate softplus (torchvision's BCE loses the
    # relative precision of tiny values even in float64: 6.93e-14 instead of 7.02e-14 at x = -30)
    v64, g64 = _value_and_grad(_precise_focal64, x.double(), t.double(), gamma=gamma)
    finite = torch.isfinite(g64)
    assert torch.allclose(v.double(), v64, rtol=1e-6, atol=1e-40)
    assert torch.allclose(g.double()[finite], g64[finite], rtol=1e-5, atol=1e-16)
    # and for the mean: torchvision in fp32 is finite too at +-100 and agrees
    x100, t100 = x[1::9][:2].repeat(4), torch.tensor([0.0, 1.0]).repeat_interleave(4)
    v_ref, _g_ref = _value_and_grad(tv_focal, x100, t100, gamma=gamma, reduction="mean")
    v2, g2 = _value_and_grad(sigmoid_focal_loss, x100, t100, gamma=gamma, reduction="mean")
    assert rel_diff(v2, v_ref) <= 1e-6 and torch.isfinite(g2).all()


def test_tiny_elementwise_values_keep_relative_precision():
    # softplus(-40) = 4.2e-18 would be lost by log(1 + exp(x)) in fp32; the corrected log keeps it
    x = torch.tensor([-40.0, -20.0, -17.0, -12.0])
    v = sigmoid_focal_loss(x, torch.zeros(4), gamma=0.0, alpha=-1.0, reduction="none")
    ref = torch.nn.functional.softplus(x.double())
    assert rel_diff(v, ref) <= 1e-6


# -- gradcheck ----------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 2.5])
def test_gradcheck_dense(gamma, small_chunks):
    x, t = _inputs((13, 11), dtype=torch.float64, soft=True, seed=7, scale=2.0)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda z: sigmoid_focal_loss(z, t, gamma=gamma, reduction="none"), (x,))
    assert torch.autograd.gradcheck(
        lambda z: sigmoid_focal_loss(z, t, gamma=gamma, alpha=-1.0, reduction="mean"), (x,)
    )


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_gradcheck_indexed(reduction, small_chunks):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(17, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(-1, 6, (17,), generator=g)
    w = torch.rand(17, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda z, ww: sigmoid_focal_loss_indexed(z, labels, weight=ww, gamma=1.5, reduction=reduction), (x, w)
    )


# -- the indexed form ----------------------------------------------------------------------------


def _one_hot(labels, num_classes, dtype=torch.float32):
    dense = torch.zeros(labels.shape[0], num_classes, dtype=dtype)
    rows = torch.nonzero((labels >= 0) & (labels < num_classes)).squeeze(1)
    dense[rows, labels[rows]] = 1.0
    return dense


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 2.0), (-1.0, 0.0), (0.6, 0.5)])
@pytest.mark.parametrize("weighted", [False, True])
def test_indexed_equals_dense_one_hot(reduction, alpha, gamma, weighted, small_chunks):
    g = torch.Generator().manual_seed(11)
    n, c = 53, 7
    x = torch.randn(n, c, generator=g) * 3
    labels = torch.randint(-1, c, (n,), generator=g)
    weight = (torch.rand(n, generator=g) * (torch.rand(n, generator=g) > 0.2)) if weighted else None
    dense = _one_hot(labels, c)

    def ref(z):
        loss = tv_focal(z, dense, alpha=alpha, gamma=gamma, reduction="none")
        if weight is not None:
            loss = loss * weight[:, None]
        return {"sum": loss.sum(), "mean": loss.mean(), "none": loss}[reduction]

    wts = torch.rand(n, c) if reduction == "none" else None
    v_ref, g_ref = _value_and_grad(ref, x, weights=wts)
    v, gr = _value_and_grad(
        sigmoid_focal_loss_indexed,
        x,
        labels,
        alpha=alpha,
        gamma=gamma,
        weight=weight,
        reduction=reduction,
        weights=wts,
    )
    assert rel_diff(v, v_ref) <= 1e-6 and rel_diff(gr, g_ref) <= 1e-5


def test_indexed_weight_gradient():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(20, 5, generator=g)
    labels = torch.randint(-1, 5, (20,), generator=g)
    w = torch.rand(20, generator=g, requires_grad=True)
    (gw,) = torch.autograd.grad(sigmoid_focal_loss_indexed(x, labels, weight=w), w)
    row = tv_focal(x, _one_hot(labels, 5), reduction="none").sum(1)
    assert rel_diff(gw, row) <= 1e-6


def test_indexed_out_of_range_labels_are_background():
    x = torch.randn(4, 3)
    labels = torch.tensor([0, -1, 7, -5])
    expected = sigmoid_focal_loss_indexed(x, torch.tensor([0, -1, -1, -1]))
    assert torch.equal(sigmoid_focal_loss_indexed(x, labels), expected)


def test_indexed_int32_labels_and_empty():
    x = torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, -1, 0], dtype=torch.int32)
    assert torch.equal(sigmoid_focal_loss_indexed(x, labels), sigmoid_focal_loss_indexed(x, labels.long()))
    empty = torch.zeros(0, 4, requires_grad=True)
    for reduction in ("sum", "mean"):
        v = sigmoid_focal_loss_indexed(empty, torch.zeros(0, dtype=torch.long), reduction=reduction)
        v.backward()
        assert v.item() == 0.0 and empty.grad.shape == (0, 4)
    assert sigmoid_focal_loss_indexed(empty, torch.zeros(0, dtype=torch.long), reduction="none").shape == (
        0,
        4,
    )


# -- dtypes, autocast, odd layouts ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_fp32(dtype):
    x, t = _inputs((31, 9), soft=True, seed=4)
    xh, th = x.to(dtype), t.to(dtype)
    v, g = _value_and_grad(sigmoid_focal_loss, xh, th, reduction="mean")
    assert v.dtype == torch.float32 and g.dtype == dtype
    # the computation itself is fp32: equal to fp32 on the rounded inputs
    v32, g32 = _value_and_grad(sigmoid_focal_loss, xh.float(), th.float(), reduction="mean")
    assert rel_diff(v, v32) <= 1e-6 and rel_diff(g, g32) <= 1e-2  # g rounded to the half dtype
    # and close to the fp32 inputs (documented tolerance: 1e-2 relative, the inputs' rounding)
    v_full, _ = _value_and_grad(sigmoid_focal_loss, x, t, reduction="mean")
    assert rel_diff(v, v_full) <= 1e-2
    vi, gi = _value_and_grad(sigmoid_focal_loss_indexed, xh, torch.arange(31) % 10 - 1)
    assert vi.dtype == torch.float32 and gi.dtype == dtype and torch.isfinite(gi).all()


def test_non_contiguous_and_bool_targets(small_chunks):
    x, t = _inputs((20, 12), seed=9)
    xt, tt = x.t(), t.t()  # non-contiguous views
    v_ref, g_ref = _value_and_grad(tv_focal, xt.contiguous(), tt.contiguous(), reduction="mean")
    v, g = _value_and_grad(sigmoid_focal_loss, xt, tt.bool(), reduction="mean")
    assert rel_diff(v, v_ref) <= 1e-6 and rel_diff(g, g_ref) <= 1e-5
    assert g.shape == xt.shape


def test_target_requiring_grad_uses_differentiable_path():
    x, t = _inputs((9, 4), dtype=torch.float64, soft=True)
    t1 = t.clone().requires_grad_()
    t2 = t.clone().requires_grad_()
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    a = sigmoid_focal_loss(x1, t1, reduction="mean")
    b = tv_focal(x2, t2, reduction="mean")
    a.backward()
    b.backward()
    assert (
        rel_diff(a, b) <= 1e-12
        and rel_diff(t1.grad, t2.grad) <= 1e-10
        and rel_diff(x1.grad, x2.grad) <= 1e-10
    )
    r = sigmoid_focal_loss_reference(x, t, reduction="none")
    assert rel_diff(r, tv_focal(x, t, reduction="none")) <= 1e-12


# -- error messages -----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{"reduction": "avg"}, {"alpha": 2.0}, {"alpha": 2.0, "reduction": "max"}])
def test_bad_parameters_raise_torchvision_errors(kwargs):
    x = torch.randn(4, 3)
    with pytest.raises(ValueError) as expected:
        torchvision.ops.sigmoid_focal_loss(x, x.sigmoid(), **kwargs)
    with pytest.raises(losskit.ConfigError) as got:
        sigmoid_focal_loss(x, x.sigmoid(), **kwargs)
    assert str(got.value) == str(expected.value)


def test_positional_arguments_as_torchvision():
    x, t = _inputs((6, 5), soft=True, seed=4)
    for args in [(), (0.4,), (0.4, 1.5), (0.4, 1.5, "sum"), (-1, 0, "mean")]:
        got = sigmoid_focal_loss(x, t, *args)
        want = tv_focal(x, t, *args)
        assert got.shape == want.shape
        assert rel_diff(got, want) <= 1e-6


def test_functional_errors():
    x = torch.randn(4, 3)
    with pytest.raises(losskit.ConfigError, match=r"gamma=-1\.0"):
        sigmoid_focal_loss_indexed(x, torch.zeros(4, dtype=torch.long), gamma=-1.0)
    with pytest.raises(
        losskit.InputError, match=r"sigmoid_focal_loss: targets: expected the shape of inputs \(4, 3\)"
    ):
        sigmoid_focal_loss(x, x[:2])
    with pytest.raises(losskit.InputError, match="inputs: expected floating-point"):
        sigmoid_focal_loss(x.long(), x)
    with pytest.raises(losskit.InputError, match=r"labels: expected integer class indices \(4,\)"):
        sigmoid_focal_loss_indexed(x, torch.zeros(4))
    with pytest.raises(losskit.InputError, match=r"pred: expected floating-point logits \(N, C\)"):
        sigmoid_focal_loss_indexed(x[0], torch.zeros(4, dtype=torch.long))
    with pytest.raises(losskit.InputError, match=r"weight: expected a float tensor \(4,\)"):
        sigmoid_focal_loss_indexed(x, torch.zeros(4, dtype=torch.long), weight=torch.ones(3))
