# SPDX-License-Identifier: Apache-2.0
"""cross_entropy against torch.nn.functional.cross_entropy; all-ignored batches; errors; no host sync."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from classification_cases import rel_diff
from torch.utils._python_dispatch import TorchDispatchMode

import losskit
from losskit.testing import assert_defaults_match
from losskit_classification import CrossEntropy, CrossEntropyConfig, cross_entropy
from losskit_classification import _torch_kernels as kernels

SHAPES = [(16, 5), (4, 5, 7), (2, 5, 3, 4)]


def _batch(shape, *, ignore_index=-100, ignored=0.2, seed=0, soft=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2
    c = shape[1]
    if soft:
        return x, torch.softmax(torch.randn(shape, generator=g) * 3, dim=1)
    t = torch.randint(0, c, (shape[0], *shape[2:]), generator=g)
    t[torch.rand(t.shape, generator=g) < ignored] = ignore_index
    return x, t


def _vg(fn, x):
    x = x.detach().clone().requires_grad_()
    v = fn(x)
    (g,) = torch.autograd.grad(v, x)
    return v.detach(), g


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("ignore_index", [-100, 2])
@pytest.mark.parametrize("weighted", [False, True])
def test_index_targets_match_torch(shape, smoothing, ignore_index, weighted):
    x, t = _batch(shape, ignore_index=ignore_index, seed=len(shape))
    weights = torch.rand(shape[1], generator=torch.Generator().manual_seed(1)) + 0.1 if weighted else None
    crit = CrossEntropy(
        label_smoothing=smoothing,
        ignore_index=ignore_index,
        class_weights=weights.tolist() if weighted else None,
    )
    w32 = crit.class_weights
    v_ref, g_ref = _vg(
        lambda z: F.cross_entropy(z, t, weight=w32, ignore_index=ignore_index, label_smoothing=smoothing), x
    )
    v, g = _vg(lambda z: crit({"pred": z}, {"target": t}), x)
    assert rel_diff(v, v_ref) <= 1e-6 and rel_diff(g, g_ref) <= 1e-5


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
@pytest.mark.parametrize("weighted", [False, True])
def test_soft_targets_match_torch(shape, smoothing, weighted):
    x, p = _batch(shape, soft=True, seed=5)
    weights = [0.5, 1.0, 2.0, 0.0, 1.5] if weighted else None
    crit = CrossEntropy(label_smoothing=smoothing, class_weights=weights)
    w = torch.tensor(weights) if weighted else None
    v_ref, g_ref = _vg(lambda z: F.cross_entropy(z, p, weight=w, label_smoothing=smoothing), x)
    v, g = _vg(lambda z: crit({"pred": z}, {"target": p}), x)
    assert rel_diff(v, v_ref) <= 1e-6 and rel_diff(g, g_ref) <= 1e-5


def test_float64_and_int32_targets():
    x, t = _batch((8, 5, 3), seed=2)
    crit = CrossEntropy(class_weights=[1.0, 2.0, 3.0, 4.0, 5.0], label_smoothing=0.2)
    x64 = x.double()
    v_ref, g_ref = _vg(
        lambda z: F.cross_entropy(
            z, t, weight=torch.arange(1.0, 6.0, dtype=torch.float64), label_smoothing=0.2
        ),
        x64,
    )
    v, g = _vg(lambda z: crit({"pred": z}, {"target": t.int()}), x64)
    assert v.dtype == torch.float64 and rel_diff(v, v_ref) <= 1e-13 and rel_diff(g, g_ref) <= 1e-12


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_all_ignored_gives_zero_with_zero_grads(weighted, smoothing):
    x = torch.randn(4, 3, 5, requires_grad=True)
    t = torch.full((4, 5), 255)
    crit = CrossEntropy(
        ignore_index=255, label_smoothing=smoothing, class_weights=[1.0, 2.0, 3.0] if weighted else None
    )
    loss = crit({"pred": x}, {"target": t})
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))
    ref = F.cross_entropy(x.detach(), t, ignore_index=255)
    assert torch.isnan(ref)  # what torch gives
    assert cross_entropy(x, t, ignore_index=255).item() == 0.0


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 4, (5, 3), generator=g)
    t[0] = -100
    crit = CrossEntropy(label_smoothing=0.1, class_weights=[1.0, 0.5, 2.0, 1.0])
    assert torch.autograd.gradcheck(lambda z: crit({"pred": z}, {"target": t}), (x,))
    p = torch.softmax(torch.randn(5, 4, 3, dtype=torch.float64, generator=g), 1)
    assert torch.autograd.gradcheck(lambda z: crit({"pred": z}, {"target": p}), (x,))


class _NoHostSync(TorchDispatchMode):
    """Fails on ``aten._local_scalar_dense`` (what ``.item()``, ``bool(t)`` and ``.tolist()`` call)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("host-device sync in the hot path")
        return func(*args, **(kwargs or {}))


def test_no_host_sync_in_forward_and_backward():
    # value checks off, as on an accelerator by default: nothing reads a tensor value on the host
    x, t = _batch((6, 4, 3), seed=1)
    t[:] = -100
    crit = CrossEntropy(label_smoothing=0.1, class_weights=[1.0, 2.0, 1.0, 1.0], normalize_across_ranks=True)
    x.requires_grad_()
    losskit.set_value_checks("never")
    try:
        with _NoHostSync():
            loss = crit({"pred": x}, {"target": t})
            loss.backward()
            crit({"pred": x}, {"target": torch.softmax(x.detach(), 1)})
            crit({"pred": x}, {"target": t.clamp_min(0)})
    finally:
        losskit.set_value_checks(None)
    assert loss.item() == 0.0
    with pytest.raises(AssertionError, match="host-device sync"), _NoHostSync():
        crit({"pred": x}, {"target": t})  # CPU default ("auto"): the finiteness check reads the loss


def test_non_finite_inputs_are_reported():
    crit = CrossEntropy()
    x = torch.randn(3, 4)
    x[1, 2] = float("inf")
    _raises(crit, {"pred": x}, {"target": torch.tensor([0, 1, 2])}, "out['pred']", "NaN or inf")
    p = torch.full((3, 4), 0.25)
    p[0, 0] = float("nan")
    _raises(crit, {"pred": x.clamp(-5, 5)}, {"target": p}, "target['target']", "NaN or inf")


def test_empty_batches_give_zero():
    crit = CrossEntropy(label_smoothing=0.1)
    x = torch.zeros(0, 4, requires_grad=True)
    for target in (torch.zeros(0, dtype=torch.long), torch.zeros(0, 4)):
        loss = crit({"pred": x}, {"target": target})
        loss.backward()
        assert loss.item() == 0.0 and x.grad.shape == (0, 4)
    _raises(crit, {"pred": torch.zeros(2, 0)}, {"target": torch.zeros(2, dtype=torch.long)}, "no classes")


def test_class_weights_is_a_buffer():
    crit = CrossEntropy(class_weights=[1.0, 2.0, 3.0])
    assert torch.equal(crit.class_weights, torch.tensor([1.0, 2.0, 3.0]))
    crit64 = crit.to(torch.float64)
    assert crit64.class_weights.dtype == torch.float64
    # not persistent: a checkpoint never overrides the configured weights, and loads across configs
    assert "class_weights" not in crit.state_dict()
    other = CrossEntropy(class_weights=[0.5, 0.5, 0.5])
    other.load_state_dict(crit.state_dict())
    assert torch.equal(other.class_weights, torch.tensor([0.5, 0.5, 0.5]))
    x, t = _batch((5, 3), seed=4)
    assert (
        rel_diff(
            crit64({"pred": x}, {"target": t}), F.cross_entropy(x, t, weight=torch.tensor([1.0, 2.0, 3.0]))
        )
        <= 1e-6
    )
    assert "class_weights" not in CrossEntropy().state_dict()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_fp32(dtype):
    x, t = _batch((32, 10, 3), seed=6)
    crit = CrossEntropy(label_smoothing=0.1)
    xh = x.to(dtype)
    v, g = _vg(lambda z: crit({"pred": z}, {"target": t}), xh)
    assert v.dtype == torch.float32 and g.dtype == dtype
    v32 = F.cross_entropy(xh.float(), t, label_smoothing=0.1)
    assert rel_diff(v, v32) <= 1e-6  # fp32 computation on the rounded logits
    assert rel_diff(v, F.cross_entropy(x, t, label_smoothing=0.1)) <= 1e-2  # documented tolerance
    p = torch.softmax(torch.randn(32, 10, 3), 1)
    assert crit({"pred": xh}, {"target": p.to(dtype)}).dtype == torch.float32


def test_autocast_bf16():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    feats, labels = torch.randn(20, 6), torch.randint(0, 4, (20,))
    crit = CrossEntropy(class_weights=[1.0, 2.0, 0.5, 1.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = crit({"pred": model(feats)}, {"target": labels})
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(model.weight.grad).all()
    assert rel_diff(loss, crit({"pred": model(feats)}, {"target": labels})) <= 2e-2


def test_deterministic_and_inputs_untouched():
    x, t = _batch((8, 6, 9), seed=8)
    x.requires_grad_()
    x0, t0 = x.detach().clone(), t.clone()
    crit = CrossEntropy(label_smoothing=0.2)
    a, b = crit({"pred": x}, {"target": t}), crit({"pred": x}, {"target": t})
    assert torch.equal(a, b)
    assert torch.equal(torch.autograd.grad(a, x)[0], torch.autograd.grad(b, x)[0])
    assert torch.equal(x.detach(), x0) and torch.equal(t, t0)


def test_example_and_config():
    crit = CrossEntropy(class_weights=[1.0, 1.0, 2.0])
    out, target = crit.example(4, generator=torch.Generator().manual_seed(0))
    assert out["pred"].shape == (4, 3)
    crit(out, target).backward()
    assert "class_weights=(1.0, 1.0, 2.0)" in repr(crit)
    for bad, where in [
        ({"label_smoothing": 1.5}, "label_smoothing"),
        ({"class_weights": [1.0, -1.0]}, "class_weights"),
        ({"class_weights": []}, "class_weights"),
        ({"ignore_index": 1.5}, "ignore_index"),
    ]:
        with pytest.raises(losskit.ConfigError, match=f"cross_entropy.{where}"):
            CrossEntropy(**bad)


# -- errors -------------------------------------------------------------------------------------


def _raises(crit, out, target, *match):
    with pytest.raises(losskit.InputError) as info:
        crit(out, target)
    for m in match:
        assert m in str(info.value), str(info.value)


def test_errors():
    crit = CrossEntropy()
    x = torch.randn(4, 3)
    t = torch.tensor([0, 1, 2, 0])
    _raises(crit, {}, {"target": t}, "cross_entropy: out['pred']: missing")
    _raises(crit, {"pred": x}, {"tgt": t}, "cross_entropy: target['target']: missing", "'tgt'")
    _raises(crit, {"pred": x.long()}, {"target": t}, "out['pred']", "floating-point")
    _raises(crit, {"pred": x[0]}, {"target": t}, "out['pred']", "(N, C)", "(3,)")
    _raises(crit, {"pred": x}, {"target": t[:2]}, "target['target']", "need shape (4,)", "got (2,)")
    _raises(crit, {"pred": x}, {"target": t.float()}, "probabilities", "(4, 3)", "got (4,)")
    _raises(crit, {"pred": x}, {"target": t.bool()}, "target['target']", "torch.bool")
    _raises(
        crit,
        {"pred": torch.randn(2, 3, 5)},
        {"target": torch.zeros(2, 4, dtype=torch.long)},
        "need shape (2, 5)",
    )
    _raises(
        CrossEntropy(class_weights=[1.0, 2.0]),
        {"pred": x},
        {"target": t},
        "C = 3 classes",
        "(4, 3)",
        "2 values",
    )


@pytest.mark.parametrize("mode", ["auto", "never"])
def test_out_of_range_indices(mode):
    losskit.set_value_checks(mode)
    try:
        crit = CrossEntropy(ignore_index=255)
        x = torch.randn(4, 3)
        _raises(
            crit,
            {"pred": x},
            {"target": torch.tensor([0, 3, 255, 1])},
            "in [0, 2]",
            "ignore_index (255)",
            "[3]",
        )
        _raises(crit, {"pred": x}, {"target": torch.tensor([0, -1, 2, 1])}, "[-1]")
        with pytest.raises(losskit.InputError, match="5, 7"):
            CrossEntropy(label_smoothing=0.1, class_weights=[1.0, 1.0, 1.0])(
                {"pred": torch.randn(2, 3, 2)}, {"target": torch.tensor([[5, 0], [7, 1]])}
            )
    finally:
        losskit.set_value_checks(None)


# -- the CPU fast path ----------------------------------------------------------------------------


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_cpu_index_targets_run_only_torchs_kernels(shape, weighted):
    # the common case costs what F.cross_entropy costs: its kernels, plus reading the value back
    x, t = _batch(shape, seed=5)
    weights = [0.5 + i for i in range(shape[1])] if weighted else None
    crit = CrossEntropy(label_smoothing=0.1, class_weights=weights)
    w = crit.class_weights
    with _RecordOps() as ref:
        F.cross_entropy(x, t, weight=w, label_smoothing=0.1)
    with _RecordOps() as ours:
        crit({"pred": x}, {"target": t})
    assert ours.ops == [*ref.ops, torch.ops.aten._local_scalar_dense.default]


def test_all_ignored_on_cpu_runs_torchs_kernel_once_then_the_sum_path():
    x, t = _batch((6, 4), seed=2)
    t[:] = -100
    with _RecordOps() as ops:
        loss = CrossEntropy()({"pred": x}, {"target": t})
    assert loss.item() == 0.0
    assert ops.ops.count(torch.ops.aten._log_softmax.default) == 2  # torch's kernel, then the sum path
    assert torch.ops.aten.clamp_min.default in ops.ops


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
@pytest.mark.parametrize("weighted", [False, True])
def test_fast_and_general_paths_agree(shape, smoothing, weighted):
    # int64 targets on CPU: the criterion's inlined call of torch's kernel; int32 targets: every check
    # first, then the functional path; normalize_across_ranks (no process group: the local normaliser):
    # the sum / normaliser kernels that accelerators run
    x, t = _batch(shape, ignore_index=1, seed=9)
    fields = {
        "label_smoothing": smoothing,
        "ignore_index": 1,
        "class_weights": [1.0 + i / 4 for i in range(shape[1])] if weighted else None,
    }
    fast, general = CrossEntropy(**fields), CrossEntropy(**fields, normalize_across_ranks=True)
    v, g = _vg(lambda z: fast({"pred": z}, {"target": t}), x)
    for crit, target in ((general, t), (fast, t.int())):
        v2, g2 = _vg(lambda z, c=crit, tt=target: c({"pred": z}, {"target": tt}), x)
        assert rel_diff(v2, v) <= 1e-6 and rel_diff(g2, g) <= 1e-6


def test_fast_path_errors_name_the_input_and_keep_torchs_error():
    crit = CrossEntropy()
    x = torch.randn(4, 3)
    cases = [
        ({"pred": x}, {"target": torch.tensor([0, 1])}, "need shape (4,)"),
        (
            {"pred": torch.randn(2, 3, 5)},
            {"target": torch.zeros(2, 4, dtype=torch.long)},
            "need shape (2, 5)",
        ),
        ({"pred": x}, {"target": torch.tensor([0, 1, 2, 3])}, "in [0, 2]"),
    ]
    for out, target, match in cases:
        with pytest.raises(losskit.InputError, match=re.escape(match)) as info:
            crit(out, target)
        assert isinstance(info.value.__cause__, (IndexError, RuntimeError, ValueError))
    with pytest.raises(losskit.InputError, match="2 values") as info:
        CrossEntropy(class_weights=[1.0, 2.0])({"pred": x}, {"target": torch.tensor([0, 1, 2, 0])})
    assert isinstance(info.value.__cause__, RuntimeError)
    # a 0-dim target is torch's unbatched form; the criterion asks for (N,) whatever N is
    with pytest.raises(losskit.InputError, match=re.escape("need shape (1,)")):
        crit({"pred": torch.randn(1, 3)}, {"target": torch.tensor(2)})


def test_functional_defaults_come_from_the_config():
    assert_defaults_match(cross_entropy, CrossEntropyConfig)
    assert CrossEntropy.Config is CrossEntropyConfig


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
def test_public_fallback_equals_the_private_bindings(shape, smoothing, weighted, monkeypatch):
    # where torch lacks the private bindings, the public API computes the same loss and gradients
    x, t = _batch(shape, ignore_index=1, seed=4)
    fields = {
        "label_smoothing": smoothing,
        "ignore_index": 1,
        "class_weights": [1.0 + i / 3 for i in range(shape[1])] if weighted else None,
    }
    cases = [
        (CrossEntropy(**fields), t),  # the fast path
        (CrossEntropy(**fields, normalize_across_ranks=True), t),  # the sum path
    ]
    private = [_vg(lambda z, c=c, tt=tt: c({"pred": z}, {"target": tt}), x) for c, tt in cases]
    t_all = torch.full_like(t, 1)  # every element ignored: the sum path after the fast one
    private.append(_vg(lambda z: cases[0][0]({"pred": z}, {"target": t_all}), x))
    assert kernels.PRIVATE_BINDINGS is not None  # this torch has them: both paths are tested
    monkeypatch.setattr(kernels, "PRIVATE_BINDINGS", None)
    public = [_vg(lambda z, c=c, tt=tt: c({"pred": z}, {"target": tt}), x) for c, tt in cases]
    public.append(_vg(lambda z: cases[0][0]({"pred": z}, {"target": t_all}), x))
    w = None if not weighted else torch.tensor(fields["class_weights"])
    v_ref, g_ref = _vg(
        lambda z: F.cross_entropy(z, t, weight=w, ignore_index=1, label_smoothing=smoothing), x
    )
    for (v, g), (vp, gp) in zip(private[:2], public[:2]):
        assert rel_diff(vp, v_ref) <= 1e-6 and rel_diff(gp, g_ref) <= 1e-6
        assert rel_diff(v, v_ref) <= 1e-6 and rel_diff(g, g_ref) <= 1e-6
    assert public[2][0].item() == 0.0 and torch.equal(public[2][1], torch.zeros_like(x))
    assert private[2][0].item() == 0.0 and torch.equal(private[2][1], torch.zeros_like(x))


def test_public_fallback_keeps_the_error_translation(monkeypatch):
    monkeypatch.setattr(kernels, "PRIVATE_BINDINGS", None)
    x = torch.randn(4, 3)
    _raises(
        CrossEntropy(), {"pred": x}, {"target": torch.tensor([0, 1, 2, 3])}, "target['target']", "in [0, 2]"
    )
    _raises(
        CrossEntropy(normalize_across_ranks=True),
        {"pred": x},
        {"target": torch.tensor([0, 1, 2, 3])},
        "target['target']",
        "in [0, 2]",
    )


def test_nan_logits_in_an_all_ignored_batch():
    # value checks on (the CPU default): NaN in is an error, not a silent 0 with NaN gradients
    x = torch.randn(4, 3)
    x[1, 0] = float("nan")
    t = torch.full((4,), -100)
    for crit in (
        CrossEntropy(),
        CrossEntropy(normalize_across_ranks=True),
        CrossEntropy(label_smoothing=0.1),
    ):
        _raises(crit, {"pred": x}, {"target": t}, "out['pred']", "NaN or inf")
    # finite logits, all ignored: 0 with zero gradients, no error
    v, g = _vg(lambda z: CrossEntropy()({"pred": z}, {"target": t}), x.nan_to_num())
    assert v.item() == 0.0 and torch.equal(g, torch.zeros_like(g))
    # value checks off: the documented treatment, 0 (nothing counted) with NaN gradients at NaN rows
    losskit.set_value_checks("never")
    try:
        v, g = _vg(lambda z: CrossEntropy()({"pred": z}, {"target": t}), x)
    finally:
        losskit.set_value_checks(None)
    assert v.item() == 0.0 and torch.isnan(g[1]).all() and torch.equal(g[0], torch.zeros(3))


def test_device_mismatch_names_both_keys_and_devices():
    x = torch.randn(4, 3)
    t = torch.zeros(4, dtype=torch.long, device="meta")
    for crit in (CrossEntropy(), CrossEntropy(normalize_across_ranks=True)):
        with pytest.raises(losskit.InputError) as info:
            crit({"pred": x}, {"target": t})
        msg = str(info.value)
        assert "target['target']" in msg and "out['pred']" in msg and "meta" in msg and "cpu" in msg
