# SPDX-License-Identifier: Apache-2.0
"""Property-based tests of the config loader: any input gives a composite or a located ConfigError."""

from __future__ import annotations

from typing import Any

import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import losskit

EXAMPLES = 300

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
keys = st.sampled_from(
    [
        "criterion",
        "weight",
        "name",
        "scale",
        "gamma",
        "mode",
        "class_weights",
        "steps",
        "flag",
        "b_from_epoch",
        "losses",
        "model",
        "x",
    ]
)
criteria = st.sampled_from(["scaled_l2", "two_terms", "nope", "focal_loss", ""])
# OmegaConf's own values: a mandatory value, interpolations that resolve, fail, or point at a parent
omegaconf_scalars = st.one_of(
    scalars,
    st.sampled_from(["???", "${loss_weight}", "${nope}", "${model}", "${losses}", "${oc.env:LOSSKIT_NOPE}"]),
)


def config_strategy(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Configs in every layout, mostly well-formed entries with junk values, built from ``leaves``."""
    values = st.recursive(
        leaves,
        lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
        max_leaves=12,
    )
    entry = st.fixed_dictionaries(
        {"criterion": criteria},
        optional={
            "weight": st.one_of(
                st.none(), st.floats(allow_nan=True), st.integers(-3, 3), st.text(max_size=3)
            ),
            "name": st.one_of(st.text(max_size=6), st.integers()),
            "scale": values,
            "gamma": values,
            "mode": st.one_of(st.sampled_from(["mean", "sum", "meen"]), values),
            "class_weights": values,
            "steps": values,
            "flag": values,
            "b_from_epoch": values,
            "x": values,
        },
    )
    return st.one_of(
        st.lists(st.one_of(entry, values), max_size=4),
        st.fixed_dictionaries({"losses": st.one_of(st.lists(st.one_of(entry, values), max_size=4), values)}),
        st.fixed_dictionaries(
            {"model": st.one_of(st.fixed_dictionaries({"losses": st.lists(entry, max_size=3)}), values)}
        ),
        values,
    )


configs = config_strategy(scalars)


def check(source: Any, registry: losskit.Registry) -> None:
    try:
        loss = losskit.build_losses(source, registry=registry)
    except losskit.ConfigError as exc:
        assert exc.problems, "a ConfigError must carry problems"
        for problem in exc.problems:
            text = str(problem)
            assert problem.message and text
            # every problem says where: a path, a line, or a source
            assert problem.path or problem.line is not None or problem.source is not None, text
        return
    assert isinstance(loss, losskit.CompositeLoss) and len(loss) >= 1


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(configs)
def test_python_structures_never_escape(registry: losskit.Registry, config: Any) -> None:
    check(config, registry)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(configs)
def test_yaml_dumps_never_escape(registry: losskit.Registry, config: Any) -> None:
    try:
        text = yaml.safe_dump(config)
    except (yaml.YAMLError, ValueError):
        return
    check(text, registry)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.text(alphabet=st.sampled_from(list("losses:- criterion_l2\n  {}[]&*!?|>#'\"0.5~,")), max_size=80))
def test_random_yaml_text_never_escapes(registry: losskit.Registry, text: str) -> None:
    if "\n" not in text and text.endswith((".yaml", ".yml")):
        text += "\n"
    check(text, registry)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    config_strategy(omegaconf_scalars),
    st.sampled_from(["root", "model", "losses", "model.losses"]),
    st.booleans(),
)
def test_omegaconf_containers_never_escape(
    registry: losskit.Registry, config: Any, part: str, struct: bool
) -> None:
    """The same junk as OmegaConf objects (with ``???`` and interpolations), given whole or in part."""
    assume(isinstance(config, (dict, list)))  # OmegaConf.create would parse a string as YAML
    if isinstance(config, dict):
        config = {**config, "loss_weight": 0.5}
    try:
        conf = OmegaConf.create(config)
    except OmegaConfBaseException:  # e.g. text that OmegaConf's grammar rejects
        return
    OmegaConf.set_struct(conf, struct)
    node: Any = None
    if part != "root" and isinstance(conf, DictConfig):
        try:
            node = OmegaConf.select(conf, part)
        except OmegaConfBaseException:  # the part is itself an interpolation that fails
            node = None
    check(node if isinstance(node, (DictConfig, ListConfig)) else conf, registry)
