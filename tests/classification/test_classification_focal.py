# SPDX-License-Identifier: Apache-2.0
"""focal_loss and the fast sigmoid focal functions against torchvision.ops.sigmoid_focal_loss."""

from __future__ import annotations

import pytest
import torch
import torchvision
from classification_cases import rel_diff

import losskit
from losskit.testing import assert_defaults_match
from losskit_classification import (
    FocalLoss,
    FocalLossConfig,
    focal_loss,
    sigmoid_focal_loss,
    sigmoid_focal_loss_indexed,
)

tv_focal = torchvision.ops.sigmoid_focal_loss


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


def _one_hot(labels, num_classes, dtype=torch.float32):
    dense = torch.zeros(labels.shape[0], num_classes, dtype=dtype)
    rows = torch.nonzero((labels >= 0) & (labels < num_classes)).squeeze(1)
    dense[rows, labels[rows]] = 1.0
    return dense


def _raises(crit, out, target, *match):
    with pytest.raises(losskit.InputError) as info:
        crit(out, target)
    for m in match:
        assert m in str(info.value), str(info.value)
    return str(info.value)


def test_focal_loss_dispatch():
    x = torch.randn(5, 3)
    labels = torch.tensor([0, 2, -1, 1, 1])
    assert torch.equal(focal_loss(x, labels), sigmoid_focal_loss_indexed(x, labels, reduction="mean"))
    assert rel_diff(focal_loss(x, _one_hot(labels, 3)), focal_loss(x, labels)) <= 1e-6


def test_autocast_bf16_criterion():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 5)
    feats = torch.randn(16, 8)
    labels = torch.randint(0, 5, (16,))
    crit = FocalLoss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = model(feats)
        assert pred.dtype == torch.bfloat16
        loss = crit({"pred": pred}, {"target": labels})
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.isfinite(model.weight.grad).all()
    ref = crit({"pred": model(feats)}, {"target": labels})
    assert rel_diff(loss, ref) <= 2e-2


def test_empty_dense_gives_zero_not_nan():
    x = torch.zeros(0, 5, requires_grad=True)
    v = sigmoid_focal_loss(x, torch.zeros(0, 5), reduction="mean")
    v.backward()
    assert v.item() == 0.0 and x.grad.shape == (0, 5)
    crit = FocalLoss()
    assert crit({"pred": x}, {"target": torch.zeros(0, 5)}).item() == 0.0


def test_deterministic_and_inputs_untouched():
    x, t = _inputs((500, 80), soft=True)
    x.requires_grad_()
    x0, t0 = x.detach().clone(), t.clone()
    crit = FocalLoss()
    a = crit({"pred": x}, {"target": t})
    (ga,) = torch.autograd.grad(a, x)
    b = crit({"pred": x}, {"target": t})
    (gb,) = torch.autograd.grad(b, x)
    assert torch.equal(a, b) and torch.equal(ga, gb)
    assert torch.equal(x.detach(), x0) and torch.equal(t, t0)


@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 2.0), (-1.0, 1.0), (1.0, 0.0)])
def test_criterion_matches_torchvision_mean(alpha, gamma):
    x, t = _inputs((4, 6, 5), soft=True, seed=12)
    crit = FocalLoss(alpha=alpha, gamma=gamma)
    v_ref, g_ref = _value_and_grad(tv_focal, x, t, alpha=alpha, gamma=gamma, reduction="mean")
    v, g = _value_and_grad(lambda z: crit({"pred": z}, {"target": t}), x)
    assert rel_diff(v, v_ref) <= 1e-6 and rel_diff(g, g_ref) <= 1e-5
    labels = torch.tensor([2, -1, 0, 5])
    x2 = x[:, :, 0]
    v_ref, g_ref = _value_and_grad(
        tv_focal, x2, _one_hot(labels, 6), alpha=alpha, gamma=gamma, reduction="mean"
    )
    v, g = _value_and_grad(lambda z: crit({"pred": z}, {"target": labels}), x2)
    assert rel_diff(v, v_ref) <= 1e-6 and rel_diff(g, g_ref) <= 1e-5


def test_criterion_config_and_example():
    crit = FocalLoss(alpha=-1.0, gamma=0.0)
    assert crit.config.alpha == -1.0 and "alpha=-1.0" in repr(crit)
    out, target = crit.example(3, generator=torch.Generator().manual_seed(0))
    loss = crit(out, target)
    loss.backward()
    assert loss.shape == () and out["pred"].grad is not None
    for bad in ({"alpha": 1.5}, {"gamma": -0.1}, {"gamma": "2"}, {"alpha": float("nan")}):
        with pytest.raises(losskit.ConfigError, match="focal_loss"):
            FocalLoss(**bad)


def test_criterion_errors():
    crit = FocalLoss()
    x = torch.randn(4, 3)
    _raises(crit, {}, {"target": x}, "focal_loss: out['pred']: missing")
    _raises(crit, {"pred": x}, {}, "focal_loss: target['target']: missing")
    _raises(crit, {"pred": x.long()}, {"target": x}, "out['pred']", "floating-point")
    _raises(crit, {"pred": x}, {"target": [1, 2]}, "target['target']", "got list")
    _raises(crit, {"pred": x}, {"target": torch.rand(4, 2)}, "target['target']", "(4, 3)", "(4, 2)")
    _raises(crit, {"pred": x}, {"target": torch.rand(4)}, "expected the shape of out['pred'] (4, 3)", "(4,)")
    msg = _raises(crit, {"pred": x}, {"target": torch.tensor([0, 1])}, "class indices must have shape (4,)")
    assert "(2,)" in msg
    _raises(crit, {"pred": x}, {"target": torch.tensor([0, 1, 3, 0])}, "in [-1, 2]", "[0, 3]")
    _raises(crit, {"pred": x}, {"target": torch.tensor([0, -2, 1, 0])}, "in [-1, 2]", "[-2, 1]")
    _raises(crit, {"pred": torch.randn(2, 3, 4)}, {"target": torch.tensor([0, 1])}, "only for pred (N, C)")
    nan = x.clone()
    nan[1, 1] = float("nan")
    _raises(crit, {"pred": nan}, {"target": torch.zeros(4, 3)}, "out['pred']", "NaN or inf")
    bad_t = torch.zeros(4, 3)
    bad_t[0, 0] = float("inf")
    _raises(crit, {"pred": x}, {"target": bad_t}, "target['target']", "NaN or inf")


def test_value_checks_never_skips_the_syncing_checks():
    crit = FocalLoss()
    x = torch.randn(4, 3)
    nan = x.clone()
    nan[0, 0] = float("nan")
    losskit.set_value_checks("never")
    try:
        assert torch.isnan(crit({"pred": nan}, {"target": torch.zeros(4, 3)}))
        # out-of-range indices are background when unchecked (no device-side failure)
        v = crit({"pred": x}, {"target": torch.tensor([0, 9, -1, 1])})
        assert torch.equal(v, crit({"pred": x}, {"target": torch.tensor([0, -1, -1, 1])}))
    finally:
        losskit.set_value_checks(None)


def test_no_host_sync_with_value_checks_off():
    from torch.utils._python_dispatch import TorchDispatchMode

    class NoSync(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                raise AssertionError("host-device sync in the hot path")
            return func(*args, **(kwargs or {}))

    x = torch.randn(6, 5, requires_grad=True)
    losskit.set_value_checks("never")
    try:
        with NoSync():
            for crit in (FocalLoss(), FocalLoss(normalize_across_ranks=True)):
                crit({"pred": x}, {"target": torch.tensor([0, 1, -1, 4, 2, 2])}).backward()
                crit({"pred": x}, {"target": torch.rand(6, 5)}).backward()
            w = torch.rand(6)
            sigmoid_focal_loss_indexed(x, torch.tensor([0, 1, -1, 4, 2, 2]), weight=w).backward()
    finally:
        losskit.set_value_checks(None)


def test_functional_defaults_come_from_the_config():
    assert_defaults_match(focal_loss, FocalLossConfig)
    assert FocalLoss.Config is FocalLossConfig


def test_device_mismatch_names_both_keys_and_devices():
    with pytest.raises(losskit.InputError) as info:
        FocalLoss()({"pred": torch.randn(4, 3)}, {"target": torch.zeros(4, 3, device="meta")})
    msg = str(info.value)
    assert "target['target']" in msg and "out['pred']" in msg and "meta" in msg and "cpu" in msg
