# SPDX-License-Identifier: Apache-2.0
"""Configs given as OmegaConf / Hydra containers or any other mapping and sequence; located errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf

import losskit

TRAINER = """\
loss_weight: 0.5
data:
  root: ???                     # never read: only the loss list is
  workers: ${oc.env:LOSSKIT_TEST_UNSET_VARIABLE}
model:
  architecture: {name: tiny}
  losses:
    - criterion: scaled_l2
      weight: ${loss_weight}
      scale: 0.25
      class_weights: [1.0, 2.0]
    - criterion: two_terms
      name: gated
      b_from_epoch: ${model.first_epoch}
  first_epoch: 2
"""


def problems(source: Any, registry: losskit.Registry, **kwargs: Any) -> list[str]:
    with pytest.raises(losskit.ConfigError) as info:
        losskit.build_losses(source, registry=registry, **kwargs)
    return [str(p) for p in info.value.problems]


@pytest.fixture
def conf() -> DictConfig:
    return OmegaConf.create(TRAINER)


def check_trainer_loss(loss: losskit.CompositeLoss) -> None:
    assert list(loss) == ["scaled_l2", "gated"]
    assert loss.weights == {"scaled_l2": 0.5, "gated": 1.0}  # weight: ${loss_weight}
    assert loss["scaled_l2"].config.scale == 0.25
    assert loss["scaled_l2"].config.class_weights == (1.0, 2.0)  # a ListConfig field value
    assert loss["gated"].config.b_from_epoch == 2  # an interpolation to another node


def test_dictconfig_model_section(conf: DictConfig, registry: losskit.Registry) -> None:
    assert isinstance(conf.model, DictConfig)
    check_trainer_loss(losskit.build_losses(conf.model, registry=registry))


def test_whole_trainer_config(conf: DictConfig, registry: losskit.Registry) -> None:
    check_trainer_loss(losskit.build_losses(conf, registry=registry))


def test_listconfig_losses(conf: DictConfig, registry: losskit.Registry) -> None:
    assert isinstance(conf.model.losses, ListConfig)
    check_trainer_loss(losskit.build_losses(conf.model.losses, registry=registry))


def test_struct_and_readonly_config(conf: DictConfig, registry: losskit.Registry) -> None:
    OmegaConf.set_struct(conf, True)
    OmegaConf.set_readonly(conf, True)
    check_trainer_loss(losskit.build_losses(conf.model, registry=registry))  # absent keys are not read


def test_loaded_from_a_file(tmp_path: Path, registry: losskit.Registry) -> None:
    path = tmp_path / "train.yaml"
    path.write_text(TRAINER)
    check_trainer_loss(losskit.build_losses(OmegaConf.load(path).model, registry=registry))


def test_the_config_is_not_modified(conf: DictConfig, registry: losskit.Registry) -> None:
    before = OmegaConf.to_yaml(conf)
    losskit.build_losses(conf.model, registry=registry)
    assert OmegaConf.to_yaml(conf) == before


def test_missing_value_is_a_located_config_error(conf: DictConfig, registry: losskit.Registry) -> None:
    conf.model.losses[0].scale = "???"
    assert problems(conf.model, registry) == ["model.losses[0].scale: mandatory value '???' is not set"]


def test_missing_interpolation_is_a_located_config_error(
    conf: DictConfig, registry: losskit.Registry
) -> None:
    del conf["loss_weight"]
    assert problems(conf.model.losses, registry) == [
        "model.losses[0].weight: cannot resolve '${loss_weight}': Interpolation key 'loss_weight' not found"
    ]


def test_interpolation_to_a_missing_value(conf: DictConfig, registry: losskit.Registry) -> None:
    conf.model.losses[1].b_from_epoch = "${data.root}"
    (problem,) = problems(conf, registry)
    assert problem.startswith("model.losses[1].b_from_epoch: cannot resolve '${data.root}': ")
    assert "data.root" in problem.split(": ", 2)[2]


def test_failing_resolver(registry: losskit.Registry) -> None:
    conf = OmegaConf.create({"losses": [{"criterion": "scaled_l2", "scale": "${oc.env:LOSSKIT_TEST_UNSET}"}]})
    (problem,) = problems(conf, registry)
    assert problem.startswith("losses[0].scale: cannot resolve '${oc.env:LOSSKIT_TEST_UNSET}': ")
    assert "LOSSKIT_TEST_UNSET" in problem


def test_every_unreadable_node_is_reported_once(registry: losskit.Registry) -> None:
    conf = OmegaConf.create(
        {
            "model": {
                "losses": [
                    {"criterion": "???", "scale": 0.5},
                    "???",
                    {"criterion": "scaled_l2", "name": "${nope}", "weight": "???", "scale": 99},
                ]
            }
        }
    )
    assert problems(conf, registry) == [
        "model.losses[0].criterion: mandatory value '???' is not set",
        "model.losses[1]: mandatory value '???' is not set",
        "model.losses[2].name: cannot resolve '${nope}': Interpolation key 'nope' not found",
        "model.losses[2].weight: mandatory value '???' is not set",
        "model.losses[2].scale (scaled_l2): 99 is out of range; allowed: [0, 10]",
    ]


def test_self_reference_is_reported(registry: losskit.Registry) -> None:
    conf = OmegaConf.create({"model": {"losses": [{"criterion": "scaled_l2", "scale": "${model}"}]}})
    assert problems(conf, registry) == [
        "model.losses[0].scale: cannot resolve '${model}': Interpolation to parent node detected"
    ]


def test_field_errors_carry_the_path_from_the_root(conf: DictConfig, registry: losskit.Registry) -> None:
    conf.model.losses[0].scale = 99.0
    conf.model.losses[1].b_from_epch = 1
    expected = [
        "model.losses[0].scale (scaled_l2): 99 is out of range; allowed: [0, 10]",
        "model.losses[1] (two_terms): unknown field 'b_from_epch'; did you mean 'b_from_epoch'? "
        "(valid fields: b_from_epoch)",
    ]
    assert problems(conf.model, registry) == expected
    assert problems(conf.model.losses, registry) == expected
    assert problems(conf, registry) == expected


def test_overrides_may_be_omegaconf(conf: DictConfig, registry: losskit.Registry) -> None:
    runtime = OmegaConf.create({"first": 5, "overrides": {"b_from_epoch": "${first}"}})
    loss = losskit.build_losses(conf.model, registry=registry, overrides=runtime.overrides)
    assert loss["gated"].config.b_from_epoch == 5


def test_hydra_composed_config(tmp_path: Path, registry: losskit.Registry) -> None:
    from hydra import compose, initialize_config_dir

    (tmp_path / "train.yaml").write_text(TRAINER)
    with initialize_config_dir(config_dir=str(tmp_path), version_base=None):
        conf = compose(config_name="train", overrides=["loss_weight=0.75", "model.losses.0.scale=0.5"])
    loss = losskit.build_losses(conf.model, registry=registry)
    assert loss.weights["scaled_l2"] == 0.75 and loss["scaled_l2"].config.scale == 0.5
    assert loss["gated"].config.b_from_epoch == 2


class Entry(Mapping[str, Any]):
    """A read-only mapping that is not a dict."""

    def __init__(self, **items: Any) -> None:
        self._items = items

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


class Entries(Sequence[Any]):
    """A sequence that is not a list or tuple."""

    def __init__(self, *items: Any) -> None:
        self._items = items

    def __getitem__(self, i: Any) -> Any:
        return self._items[i]

    def __len__(self) -> int:
        return len(self._items)


def test_any_mapping_and_sequence(registry: losskit.Registry) -> None:
    config = Entry(model=Entry(losses=Entries(Entry(criterion="scaled_l2", class_weights=Entries(1.0, 3.0)))))
    loss = losskit.build_losses(config, registry=registry)
    assert loss["scaled_l2"].config.class_weights == (1.0, 3.0)
    assert problems(Entries(Entry(criterion="scaled_l2", steps=0)), registry) == [
        "[0].steps (scaled_l2): 0 is out of range; allowed: >= 1"
    ]


def test_a_python_structure_that_contains_itself(registry: losskit.Registry) -> None:
    entry: dict[str, Any] = {"criterion": "scaled_l2"}
    entry["class_weights"] = [entry]
    assert problems([entry], registry) == [
        "[0].class_weights[0]: the config refers to itself here; a loss config must be a tree"
    ]


def test_plain_configs_do_not_import_omegaconf(tmp_path: Path) -> None:
    """omegaconf is not a dependency of the core: loading plain configs never imports it."""
    code = textwrap.dedent(
        """
        import sys
        import losskit
        assert "omegaconf" not in sys.modules, "importing losskit imported omegaconf"
        losskit.build_losses({"losses": [{"criterion": "charbonnier_loss", "eps": 0.01}]})
        losskit.build_losses("losses: [{criterion: charbonnier_loss}]")
        losskit.build_losses(({"criterion": "charbonnier_loss", "weight": 2},))
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("omegaconf", "hydra")))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
