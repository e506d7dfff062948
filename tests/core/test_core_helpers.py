# SPDX-License-Identifier: Apache-2.0
"""The chores every criterion shares, defined once in the core: autocast off, a graph-keeping zero,
missing-key and device-mismatch errors, and the config-defaults check."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

import losskit
from losskit.checks import (
    check_same_device,
    explain_non_finite,
    integral_scalar,
    missing_key_error,
    real_scalar,
)
from losskit.tensors import autocast_off, graph_zero
from losskit.testing import assert_defaults_match


def test_graph_zero_has_zero_gradients_even_through_nan():
    x = torch.tensor([1.0, float("nan"), float("inf")], requires_grad=True)
    y = torch.ones(2, 2, dtype=torch.float64, requires_grad=True)
    zero = graph_zero(x, None, y)
    assert zero.dtype == torch.float32 and zero.item() == 0.0 and zero.requires_grad
    gx, gy = torch.autograd.grad(zero, (x, y))
    assert torch.equal(gx, torch.zeros(3)) and torch.equal(gy, torch.zeros(2, 2, dtype=torch.float64))
    assert graph_zero().item() == 0.0 and not graph_zero().requires_grad


def test_autocast_off_disables_cpu_autocast_and_accepts_types():
    a = torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
        with autocast_off(a.device):
            assert (a @ a).dtype == torch.float32
        with autocast_off("cpu"):
            assert (a @ a).dtype == torch.float32
    with autocast_off("meta"):  # a device type without autocast is a no-op, not an error
        pass


def test_missing_key_error_lists_the_keys():
    err = missing_key_error("foo_loss", "target['gt'][1]", "labels", {"boxes": 1})
    assert isinstance(err, losskit.InputError)
    assert str(err) == "foo_loss: target['gt'][1]['labels']: missing; target['gt'][1] has keys 'boxes'"
    err = missing_key_error("foo_loss", "out", "pred", {}, "(B, C) logits")
    assert str(err) == "foo_loss: out['pred']: missing; out has keys none; expected: (B, C) logits"


def test_check_same_device_names_both_keys_and_devices():
    a = torch.zeros(2)
    check_same_device("foo_loss", ("out['pred']", a), ("target['target']", torch.ones(2)), ("x", None))
    with pytest.raises(losskit.InputError) as info:
        check_same_device("foo_loss", ("out['pred']", a), ("target['target']", torch.zeros(2, device="meta")))
    assert str(info.value) == (
        "foo_loss: target['target']: is on meta, but out['pred'] is on cpu; move both to the same device"
    )


def test_explain_non_finite_names_the_first_non_finite_input():
    ok, bad = torch.ones(3), torch.tensor([1.0, float("inf")])
    assert explain_non_finite("foo_loss", [("out['pred']", ok), ("x", None)]) is None
    err = explain_non_finite("foo_loss", [("out['pred']", ok), ("out['aux']", bad), ("t", bad.neg())])
    assert isinstance(err, losskit.InputError)
    assert str(err) == "foo_loss: out['aux']: contains non-finite values (NaN or inf)"
    nan = explain_non_finite("foo_loss", [("target['target']", torch.tensor(float("nan")))])
    assert str(nan) == "foo_loss: target['target']: contains non-finite values (NaN or inf)"


@dataclass(frozen=True)
class _Config:
    gamma: float = losskit.option(2.0, ge=0.0, doc="g")
    mode: str = losskit.option("mean", doc="m")


def test_assert_defaults_match():
    def good(x: int, *, gamma: float = _Config.gamma, mode: str = _Config.mode) -> None: ...

    def bad(x: int, *, gamma: float = 3.0) -> None: ...

    def unrelated(x: int) -> None: ...

    assert_defaults_match(good, _Config)
    with pytest.raises(AssertionError, match=r"gamma: 3\.0 != 2\.0"):
        assert_defaults_match(bad, _Config)
    with pytest.raises(AssertionError, match="no parameter"):
        assert_defaults_match(unrelated, _Config)


def test_criterion_is_generic_over_its_config():
    class Tiny(losskit.Criterion[_Config]):
        name = "tiny"
        Config = _Config

    crit = Tiny(gamma=1.0)
    assert isinstance(crit.config, _Config) and crit.config.gamma == 1.0
    with pytest.raises(losskit.ConfigError, match=r"tiny\.gamma"):
        Tiny(gamma=-1.0)


@pytest.mark.parametrize(
    ("value", "as_int", "as_real"),
    [
        (3, 3, 3.0),
        (np.int64(3), 3, 3.0),
        (np.uint8(7), 7, 7.0),
        (torch.tensor(3), 3, 3.0),
        (torch.tensor(2.5), None, 2.5),
        (2.5, None, 2.5),
        (np.float32(2.5), None, 2.5),
        (True, None, None),
        (np.bool_(True), None, None),
        (torch.tensor(True), None, None),
        ("2", None, None),
        (torch.tensor([3]), None, None),
        (None, None, None),
    ],
)
def test_integral_and_real_scalars(value, as_int, as_real):
    got = integral_scalar(value)
    assert got == as_int and (got is None or type(got) is int)
    real = real_scalar(value)
    assert real == as_real and (real is None or type(real) is float)


def test_set_epoch_takes_any_integral_scalar():
    @dataclass(frozen=True)
    class Cfg:
        pass

    class Crit(losskit.Criterion[Cfg]):
        name = "crit"
        Config = Cfg

    crit = Crit()
    for value in (np.int64(3), torch.tensor(3), np.int32(3)):
        crit.set_epoch(value)  # type: ignore[arg-type]
        assert crit.epoch == 3 and type(crit.epoch) is int
    for bad in (np.int64(-1), torch.tensor(1.0), np.bool_(True), torch.tensor([1])):
        with pytest.raises(losskit.ConfigError, match="set_epoch expects an int >= 0"):
            crit.set_epoch(bad)  # type: ignore[arg-type]


def test_get_img_size_accepts_any_real_scalar_or_pair() -> None:
    import numpy as np

    from losskit.checks import get_img_size

    for size in (640, 640.0, np.int64(640), torch.tensor(640), torch.tensor(640.0)):
        assert get_img_size({"img_size": size}, criterion="c") == (640.0, 640.0)
    for size in ((480, 640), [480, 640], torch.tensor([480, 640]), (np.int32(480), 640.0)):
        assert get_img_size({"img_size": size}, criterion="c") == (480.0, 640.0)
    assert get_img_size({"img_size": np.int64(352)}, criterion="c", integral=True) == (352, 352)
    bad = [
        ({"img_size": 0}, "positive finite sizes"),
        ({"img_size": (480, float("inf"))}, "positive finite sizes"),
        ({"img_size": "640"}, "expected an int or (H, W) of the network input, got '640'"),
        ({"img_size": (1, 2, 3)}, "expected an int or (H, W)"),
        ({"img_size": True}, "expected an int or (H, W)"),
        ({"size": 640}, "target['img_size']: missing; target has keys 'size'"),
    ]
    for target, message in bad:
        with pytest.raises(losskit.InputError) as info:
            get_img_size(target, criterion="c")
        assert message in str(info.value) and "target" in str(info.value)
    with pytest.raises(losskit.InputError, match=r"\(integers\), got 352\.5"):
        get_img_size({"img_size": 352.5}, criterion="c", integral=True)


def test_get_levels_checks_what_every_dense_head_shares() -> None:
    from losskit.checks import get_levels

    a, b = torch.zeros(2, 7, 4, 4), torch.zeros(2, 7, 2, 2)
    assert get_levels([a, b], "out['pred']", criterion="c", shape="(B, 5 + C, H, W)") == [a, b]
    seen: list[int] = []
    get_levels((a, b), "out['pred']", criterion="c", shape="(B, C, H, W)", each=lambda i, p: seen.append(i))
    assert seen == [0, 1]
    bad = [
        (
            a,
            "out['pred']: expected a list over pyramid levels of (B, C, H, W) raw head outputs, got a tensor",
        ),
        (
            [],
            "out['pred']: expected a list over pyramid levels of (B, C, H, W) raw head outputs, got an empty",
        ),
        ([a, [1.0]], "out['pred'][1]: expected a tensor (B, C, H, W), got list"),
        ([a, b.long()], "out['pred'][1]: expected a floating-point tensor, got torch.int64"),
        ([a, b[0]], "out['pred'][1]: expected shape (B, C, H, W), got shape (7, 2, 2); or reshape"),
        ([a, b[..., :0]], "out['pred'][1]: expected a non-empty grid"),
        ([a, b[:1]], "out['pred'][1]: batch size 1 differs from level 0's 2"),
        ([a, b[:, :6]], "out['pred'][1]: expected 7 channels (5 + C) as level 0, got shape (2, 6, 2, 2)"),
        ([a, b.double()], "out['pred'][1]: dtype torch.float64 differs from out['pred'][0]'s torch.float32"),
        (
            [a, b.to("meta")],
            "out['pred'][1]: is on meta, but out['pred'][0] is on cpu; move both to one device",
        ),
    ]
    for pred, message in bad:
        with pytest.raises(losskit.InputError) as info:
            get_levels(
                pred,
                "out['pred']",
                criterion="c",
                shape="(B, C, H, W)",
                channels="5 + C",
                rank_hint="; or reshape",
            )
        assert str(info.value).startswith("c: " + message), str(info.value)
    assert get_levels([], "out['pred']", criterion="c", shape="(B, C, H, W)", allow_empty=True) == []
