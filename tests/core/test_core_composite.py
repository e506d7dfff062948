# SPDX-License-Identifier: Apache-2.0
"""build_losses and the composite: weights, parts/total arithmetic, terms, epochs, module behaviour."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import losskit


def batch() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    pred = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    return {"pred": pred}, {"target": torch.zeros(3)}


def test_parts_and_total_arithmetic(registry: losskit.Registry) -> None:
    loss = losskit.build_losses(
        [
            {"criterion": "scaled_l2", "weight": 2.5},
            {"criterion": "two_terms", "weight": None},
            {"criterion": "scaled_l2", "name": "off", "weight": 0, "scale": 3.0},
        ],
        registry=registry,
        epoch=1,
    )
    out, target = batch()
    result = loss(out, target)
    mse = (1 + 4 + 9) / 3
    a, b = 6.0, 12.5
    assert set(result.parts) == {"scaled_l2", "two_terms", "two_terms/a", "two_terms/b", "off", "total"}
    assert result.parts["scaled_l2"].item() == pytest.approx(mse)
    assert result.parts["two_terms/a"].item() == pytest.approx(a)
    assert result.parts["two_terms/b"].item() == pytest.approx(b)
    assert result.parts["two_terms"].item() == pytest.approx(a + b)
    assert result.parts["off"].item() == pytest.approx(3 * mse)  # logged unweighted, even at weight 0
    assert result.total.item() == pytest.approx(2.5 * mse + (a + b))
    assert result.parts["total"].item() == pytest.approx(result.total.item())
    assert all(not p.requires_grad for p in result.parts.values())
    assert result.total.requires_grad
    assert set(result.diagnostics) == {"two_terms/count", "two_terms/b_active"}
    assert result.diagnostics["two_terms/count"].item() == 3
    result.total.backward()
    # d/dpred: 2.5 * 2 * pred / 3 + 1 (a) + 2 (b); the weight-0 loss contributes nothing.
    expected = 2.5 * 2 * torch.tensor([1.0, 2.0, 3.0]) / 3 + 3.0
    torch.testing.assert_close(out["pred"].grad, expected)


@pytest.mark.parametrize(("weight", "factor"), [(None, 1.0), (0, 0.0), (2.5, 2.5)])
def test_weight_scales_total_only(weight: float | None, factor: float, registry: losskit.Registry) -> None:
    loss = losskit.build_losses([{"criterion": "scaled_l2", "weight": weight}], registry=registry)
    result = loss(*batch())
    assert result.total.item() == pytest.approx(factor * 14 / 3)
    assert result.parts["scaled_l2"].item() == pytest.approx(14 / 3)


def test_same_criterion_twice_under_two_names(registry: losskit.Registry) -> None:
    loss = losskit.build_losses(
        "losses:\n  - {criterion: scaled_l2, name: small, scale: 1.0}\n  - {criterion: scaled_l2, name: big, scale: 2.0, weight: 0.5}\n",
        registry=registry,
    )
    result = loss(*batch())
    assert result.parts["big"].item() == pytest.approx(2 * result.parts["small"].item())
    assert result.total.item() == pytest.approx(2 * result.parts["small"].item())
    assert loss["small"] is not loss["big"]


def test_set_epoch_reaches_every_criterion(registry: losskit.Registry) -> None:
    loss = losskit.build_losses(
        [
            {"criterion": "two_terms", "name": "t1"},
            {"criterion": "two_terms", "name": "t2", "b_from_epoch": 3},
        ],
        registry=registry,
    )
    out, target = batch()
    r0 = loss(out, target)
    assert r0.parts["t1/b"].item() == 0.0 and r0.parts["t2/b"].item() == 0.0
    assert set(r0.parts) == set(loss(out, target).parts)
    loss.set_epoch(1)
    assert loss["t1"].epoch == 1 and loss["t2"].epoch == 1
    r1 = loss(out, target)
    assert r1.parts["t1/b"].item() == pytest.approx(12.5) and r1.parts["t2/b"].item() == 0.0
    assert set(r0.parts) == set(r1.parts)  # fixed keys whatever the epoch
    loss.set_epoch(3)
    assert loss(out, target).parts["t2/b"].item() == pytest.approx(12.5)
    loss.set_epoch(np.int64(3))  # type: ignore[arg-type]  # any integral scalar
    assert loss["t2"].epoch == 3 and type(loss["t2"].epoch) is int
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(losskit.ConfigError, match="set_epoch expects an int >= 0"):
            loss.set_epoch(bad)  # type: ignore[arg-type]


def test_state_dict_to_and_repr(registry: losskit.Registry) -> None:
    loss = losskit.build_losses(
        [{"criterion": "two_terms", "weight": 2.0}, {"criterion": "scaled_l2", "name": "l2", "scale": 0.5}],
        registry=registry,
    )
    state = loss.state_dict()
    assert list(state) == ["criteria.two_terms.offset"]
    state["criteria.two_terms.offset"] = torch.tensor(1.5)
    loss.load_state_dict(state)
    assert loss["two_terms"].offset.item() == 1.5
    moved = loss.to(torch.float64)
    assert moved is loss and loss["two_terms"].offset.dtype == torch.float64
    text = repr(loss)
    assert "(two_terms, weight=2): TwoTerms()" in text
    assert "(l2, weight=1): ScaledL2(scale=0.5)" in text
    assert len(loss) == 2 and list(loss) == ["two_terms", "l2"]


def test_device_runtime_argument(registry: losskit.Registry) -> None:
    loss = losskit.build_losses([{"criterion": "two_terms"}], registry=registry, device="cpu")
    assert loss["two_terms"].offset.device.type == "cpu"


def test_overrides_set_a_field_of_every_criterion_declaring_it(registry: losskit.Registry) -> None:
    loss = losskit.build_losses(
        [{"criterion": "scaled_l2", "scale": 1.0}, {"criterion": "two_terms"}],
        registry=registry,
        overrides={"scale": 4.0},
    )
    assert loss["scaled_l2"].config.scale == 4.0
    with pytest.raises(losskit.ConfigError) as error:
        losskit.build_losses([{"criterion": "scaled_l2"}], registry=registry, overrides={"nope": 1})
    assert str(error.value) == (
        "overrides: 'nope' is not a field of any criterion in the config "
        "(scaled_l2: scale, gamma, mode, class_weights, steps, flag)"
    )
    with pytest.raises(losskit.ConfigError, match=r"scale \(scaled_l2\): 99 is out of range"):
        losskit.build_losses([{"criterion": "scaled_l2"}], registry=registry, overrides={"scale": 99})


def test_keyword_arguments_are_explicit(registry: losskit.Registry) -> None:
    """A field given as a keyword (the old ``**runtime`` style) says to use ``overrides``."""
    with pytest.raises(losskit.ConfigError) as error:
        losskit.build_losses([{"criterion": "scaled_l2"}], registry=registry, scale=4.0)  # type: ignore[arg-type]
    assert str(error.value) == (
        "build_losses() got an unexpected keyword argument 'scale'; it takes registry, device, epoch and "
        "overrides: to set a field of every criterion that declares it, pass overrides={'scale': ...}"
    )


EPOCH_HINT = (
    "losskit does not take the epoch at build time: call `loss.set_epoch(epoch)` each epoch "
    "(or `build_losses(..., epoch=N)` for the first one)"
)


@pytest.mark.parametrize("key", ["cur_epoch", "epoch_idx", "current_epoch", "start_epoch"])
def test_epoch_keywords_say_to_call_set_epoch(registry: losskit.Registry, key: str) -> None:
    with pytest.raises(losskit.ConfigError) as error:
        losskit.build_losses([{"criterion": "scaled_l2"}], registry=registry, **{key: 3})
    assert str(error.value) == f"build_losses() got an unexpected keyword argument {key!r}: {EPOCH_HINT}"
    with pytest.raises(losskit.ConfigError) as error:
        losskit.build_losses([{"criterion": "two_terms"}], registry=registry, overrides={key: 3})
    assert str(error.value) == (
        f"overrides: {key!r} is not a field of any criterion in the config (two_terms: b_from_epoch); "
        + EPOCH_HINT
    )


def test_composite_never_syncs(registry: losskit.Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    loss = losskit.build_losses([{"criterion": "two_terms"}, {"criterion": "scaled_l2"}], registry=registry)
    out, target = batch()

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("host sync in the composite")

    monkeypatch.setattr(torch.Tensor, "item", forbidden)
    monkeypatch.setattr(torch.Tensor, "tolist", forbidden)
    monkeypatch.setattr(torch.Tensor, "__bool__", forbidden)
    monkeypatch.setattr(torch.Tensor, "__float__", forbidden)
    result = loss(out, target)
    assert isinstance(result.total, torch.Tensor)


class Misbehaving(losskit.Criterion):
    """Returns whatever the test asks for."""

    name = "misbehaving"
    terms = ("x",)

    from dataclasses import dataclass as _dc

    @_dc(frozen=True)
    class Config:
        pass

    def forward(self, out: Any, target: Any) -> Any:
        return out["value"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (torch.tensor(1.0), "returned one tensor but declares terms ['x']"),
        ({"y": torch.tensor(1.0)}, "returned terms ['y'] but declares ['x']"),
        ({"x": torch.ones(2)}, "term 'x' has shape (2,), not a scalar"),
        (3, "returned int, not a tensor or a mapping"),
    ],
)
def test_criteria_breaking_the_protocol_are_named(value: Any, message: str) -> None:
    reg = losskit.Registry(autoload=False)
    reg.register(Misbehaving)
    loss = losskit.build_losses([{"criterion": "misbehaving"}], registry=reg)
    with pytest.raises(losskit.LosskitError) as info:
        loss({"value": value}, {})
    assert str(info.value) == f"misbehaving: {message}"


def test_inputs_are_not_mutated(registry: losskit.Registry) -> None:
    loss = losskit.build_losses([{"criterion": "scaled_l2"}, {"criterion": "two_terms"}], registry=registry)
    out, target = batch()
    before = {k: v.clone() for k, v in out.items()}, dict(target)
    loss(out, target)
    assert set(out) == {"pred"} and set(target) == {"target"}
    torch.testing.assert_close(out["pred"], before[0]["pred"])


def test_missing_key_error_names_criterion_and_key(registry: losskit.Registry) -> None:
    loss = losskit.build_losses([{"criterion": "scaled_l2"}], registry=registry)
    with pytest.raises(losskit.InputError) as info:
        loss({"logits": torch.ones(2)}, {"target": torch.ones(2)})
    assert str(info.value) == "scaled_l2: out['pred']: missing; out has keys 'logits'; expected: (N, *) float"
    with pytest.raises(losskit.InputError, match=r"scaled_l2: target\['target'\]: expected a tensor"):
        loss({"pred": torch.ones(2)}, {"target": [1.0, 2.0]})


def test_losses_keep_graphs_per_criterion(registry: losskit.Registry) -> None:
    loss = losskit.build_losses([{"criterion": "scaled_l2"}, {"criterion": "two_terms"}], registry=registry)
    out, target = batch()
    result = loss(out, target)
    (grad,) = torch.autograd.grad(result.losses["scaled_l2"], out["pred"])
    torch.testing.assert_close(grad, 2 * out["pred"].detach() / 3)
