# SPDX-License-Identifier: Apache-2.0
"""The config loader: layouts, weights, names, safe YAML, and every error with its location."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import losskit

SEED_LAYOUT = """\
model:
  losses:
    - criterion: scaled_l2
      scale: 0.1
      weight: ~
"""


def problems(source: object, registry: losskit.Registry) -> list[str]:
    with pytest.raises(losskit.ConfigError) as info:
        losskit.load_config(source, registry=registry)
    assert isinstance(info.value, ValueError)
    return [str(p) for p in info.value.problems]


def one_problem(source: object, registry: losskit.Registry) -> str:
    found = problems(source, registry)
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize(
    "source",
    [
        SEED_LAYOUT,
        "losses:\n  - criterion: scaled_l2\n    scale: 0.1\n",
        "- criterion: scaled_l2\n  scale: 0.1\n",
        {"model": {"losses": [{"criterion": "scaled_l2", "scale": 0.1}]}},
        {"losses": [{"criterion": "scaled_l2", "scale": 0.1}]},
        [{"criterion": "scaled_l2", "scale": 0.1}],
        ({"criterion": "scaled_l2", "scale": 0.1},),
    ],
)
def test_layouts_are_equivalent(source: object, registry: losskit.Registry) -> None:
    cfg = losskit.load_config(source, registry=registry)
    (entry,) = cfg.entries
    assert (entry.name, entry.criterion, entry.weight) == ("scaled_l2", "scaled_l2", 1.0)
    assert entry.config.scale == 0.1
    assert entry.config.gamma == 2.0  # schema default for the absent field


def test_file_path_str_and_pathlike(tmp_path: Path, registry: losskit.Registry) -> None:
    path = tmp_path / "loss.yaml"
    path.write_text(SEED_LAYOUT)
    for source in (path, str(path)):
        cfg = losskit.load_config(source, registry=registry)
        assert cfg.source == str(path)
        assert cfg.entries[0].config.scale == 0.1


def test_other_top_level_keys_are_ignored(registry: losskit.Registry) -> None:
    cfg = losskit.load_config(
        {"data": {"root": "/x"}, "model": {"name": "yolox", "losses": [{"criterion": "scaled_l2"}]}},
        registry=registry,
    )
    assert cfg.entries[0].criterion == "scaled_l2"


@pytest.mark.parametrize(("given", "expected"), [(None, 1.0), (0, 0.0), (2.5, 2.5), (3, 3.0)])
def test_weight_semantics(given: float | None, expected: float, registry: losskit.Registry) -> None:
    cfg = losskit.load_config([{"criterion": "scaled_l2", "weight": given}], registry=registry)
    assert cfg.entries[0].weight == expected
    assert isinstance(cfg.entries[0].weight, float)


def test_absent_weight_is_one(registry: losskit.Registry) -> None:
    assert losskit.load_config([{"criterion": "scaled_l2"}], registry=registry).entries[0].weight == 1.0


def test_lists_become_tuples_and_ints_widen_to_float(registry: losskit.Registry) -> None:
    cfg = losskit.load_config(
        [{"criterion": "scaled_l2", "class_weights": [1, 2.5], "scale": 2}], registry=registry
    )
    assert cfg.entries[0].config.class_weights == (1.0, 2.5)
    assert cfg.entries[0].config.scale == 2.0 and isinstance(cfg.entries[0].config.scale, float)


# --- errors -------------------------------------------------------------------------------------


def test_yaml_syntax_error_has_line(registry: losskit.Registry) -> None:
    msg = one_problem("model:\n  losses:\n    - criterion: scaled_l2\n     scale: [1,\n", registry)
    assert msg.startswith("<string>:")
    assert "YAML syntax error" in msg


def test_yaml_syntax_error_in_file_names_file_and_line(tmp_path: Path, registry: losskit.Registry) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("losses:\n  - criterion: scaled_l2\n    scale: {a: 1\n")
    msg = one_problem(path, registry)
    assert msg.startswith(f"{path}:")
    assert "YAML syntax error" in msg


def test_missing_file(registry: losskit.Registry) -> None:
    assert "config file not found: 'nope/loss.yaml'" in one_problem("nope/loss.yaml", registry)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            "model:\n  name: x\n",
            "line 1: model: missing 'losses' (a list of loss entries); model has keys 'name'",
        ),
        ("foo: 1\n", "no loss list found: expected 'model.losses', 'losses' or a bare list; got keys 'foo'"),
        ("losses: []\n", "line 1: losses: the list of losses is empty"),
        ("model:\n  losses:\n", "line 2: model.losses: expected a list of loss entries, got null"),
        ("losses: 3\n", "losses: expected a list of loss entries, got 3 (an int)"),
        ("", "the config is empty"),
        ("42\n", "expected a mapping with 'losses' or a list of loss entries, got 42 (an int)"),
        ("model: 5\n", "model: expected a mapping with a 'losses' list, got 5 (an int)"),
    ],
)
def test_structure_errors(source: str, expected: str, registry: losskit.Registry) -> None:
    assert expected in one_problem(source, registry)


def test_entry_not_a_mapping(registry: losskit.Registry) -> None:
    msg = one_problem("losses:\n  - scaled_l2\n", registry)
    assert msg == "line 2: losses[0]: expected a mapping with a 'criterion' key, got 'scaled_l2' (a str)"


def test_missing_criterion_lists_installed(registry: losskit.Registry) -> None:
    msg = one_problem("losses:\n  - weight: 1.0\n", registry)
    assert msg == "line 2: losses[0]: missing 'criterion'; installed criteria: scaled_l2, two_terms"


def test_criterion_not_a_string(registry: losskit.Registry) -> None:
    assert "losses[0].criterion: expected a criterion name (a string), got 3 (an int)" in one_problem(
        "losses:\n  - criterion: 3\n", registry
    )


def test_unknown_criterion_suggests_and_lists(registry: losskit.Registry) -> None:
    msg = one_problem("losses:\n  - criterion: scaled_l3\n", registry)
    assert msg == (
        "line 2: losses[0].criterion: unknown criterion 'scaled_l3'; did you mean 'scaled_l2'?; "
        "installed criteria: scaled_l2, two_terms"
    )


def test_unknown_first_party_criterion_says_what_to_install(registry: losskit.Registry) -> None:
    msg = one_problem("model:\n  losses:\n    - criterion: yolox_loss\n", registry)
    assert "model.losses[0].criterion: criterion 'yolox_loss' is not installed" in msg
    assert "pip install losskit-detection-yolox" in msg
    msg = one_problem("losses:\n  - criterion: focal_los\n", registry)
    assert "did you mean 'focal_loss' (from losskit-classification, not installed)?" in msg


def test_unknown_field_did_you_mean_and_valid_fields(registry: losskit.Registry) -> None:
    msg = one_problem("losses:\n  - criterion: scaled_l2\n\n    scael: 1.0\n", registry)
    assert msg == (
        "line 4: losses[0] (scaled_l2): unknown field 'scael'; did you mean 'scale'? "
        "(valid fields: scale, gamma, mode, class_weights, steps, flag)"
    )


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("scale", "'0.5'", "expected a float, got '0.5' (a string); write it as a number without quotes"),
        (
            "scale",
            "1e-3",
            "expected a float, got '1e-3' (a string); write it as a number without quotes (YAML reads exponents like 1e-3 as strings: write 1.0e-3)",
        ),
        ("scale", "true", "expected a float, got True (a bool)"),
        ("scale", "[1, 2]", "expected a float, got [1, 2] (a list)"),
        ("scale", "{a: 1}", "expected a float, got {'a': 1} (a mapping)"),
        ("scale", "~", "expected a float, got None"),
        ("scale", ".nan", "expected a finite float, got nan"),
        ("scale", ".inf", "expected a finite float, got inf"),
        ("scale", "-1.0", "-1 is out of range; allowed: [0, 10]"),
        ("scale", "11", "11 is out of range; allowed: [0, 10]"),
        ("steps", "2.5", "expected an int, got 2.5"),
        ("steps", "0", "0 is out of range; allowed: >= 1"),
        ("flag", "1", "expected a bool (true/false), got 1"),
        ("mode", "meen", "got 'meen' (a string); did you mean 'mean'?; allowed: 'mean', 'sum'"),
        ("class_weights", "1.0", "expected list[float] | null, got 1.0"),
        ("class_weights", "[1.0, -2.0]", "item [1]: -2 is out of range; allowed: >= 0"),
    ],
)
def test_field_type_and_range_errors(
    field: str, value: str, expected: str, registry: losskit.Registry
) -> None:
    msg = one_problem(f"model:\n  losses:\n    - criterion: scaled_l2\n      {field}: {value}\n", registry)
    assert msg == f"line 4: model.losses[0].{field} (scaled_l2): {expected}"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("-1", "expected a float >= 0, got -1"),
        ("-0.5", "expected a float >= 0, got -0.5"),
        (".nan", "expected a finite float >= 0, got nan"),
        (".inf", "expected a finite float >= 0, got inf"),
        ("'2'", "expected a float >= 0 (or null for 1.0), got '2' (a str)"),
        ("true", "expected a float >= 0 (or null for 1.0), got True (a bool)"),
        ("[1]", "expected a float >= 0 (or null for 1.0), got a list"),
    ],
)
def test_weight_errors(value: str, expected: str, registry: losskit.Registry) -> None:
    msg = one_problem(f"losses:\n  - criterion: scaled_l2\n    weight: {value}\n", registry)
    assert msg == f"line 3: losses[0].weight: {expected}"


def test_duplicate_names(registry: losskit.Registry) -> None:
    msg = one_problem("losses:\n  - criterion: scaled_l2\n  - criterion: scaled_l2\n", registry)
    assert msg == (
        "line 3: losses[1].criterion: duplicate loss name 'scaled_l2' (also at losses[0]); "
        "give one of them a distinct 'name'"
    )
    msg = one_problem(
        "losses:\n  - {criterion: scaled_l2, name: a}\n  - {criterion: two_terms, name: a}\n", registry
    )
    assert "losses[1].name: duplicate loss name 'a' (also at losses[0])" in msg


@pytest.mark.parametrize("name", ["'with space'", "'a/b'", "'a.b'", "3", "''"])
def test_invalid_names(name: str, registry: losskit.Registry) -> None:
    msg = one_problem(f"losses:\n  - criterion: scaled_l2\n    name: {name}\n", registry)
    assert "losses[0].name: expected a name of letters, digits" in msg


def test_same_criterion_twice_with_names(registry: losskit.Registry) -> None:
    cfg = losskit.load_config(
        "losses:\n  - {criterion: scaled_l2, name: l2_a, scale: 1.0}\n  - {criterion: scaled_l2, name: l2_b, scale: 3.0}\n",
        registry=registry,
    )
    assert [(e.name, e.config.scale) for e in cfg.entries] == [("l2_a", 1.0), ("l2_b", 3.0)]


def test_python_tags_are_rejected(registry: losskit.Registry) -> None:
    src = "losses:\n  - criterion: scaled_l2\n    scale: !!python/object/apply:os.system ['echo hacked']\n"
    msg = one_problem(src, registry)
    assert msg.startswith(
        "line 3: losses[0].scale: YAML tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed"
    )
    msg = one_problem("losses: !!python/name:os.system\n", registry)
    assert "is not allowed (configs are read with a safe loader)" in msg


def test_duplicate_yaml_keys_are_reported(registry: losskit.Registry) -> None:
    msg = one_problem("losses:\n  - criterion: scaled_l2\n    scale: 1.0\n    scale: 2.0\n", registry)
    assert (
        msg
        == "line 4: losses[0].scale: duplicate key 'scale' (first at line 3); YAML would keep only the last"
    )


def test_recursive_alias_is_reported(registry: losskit.Registry) -> None:
    assert "recursive YAML alias" in one_problem("losses: &a [*a]\n", registry)


def test_every_problem_is_reported_at_once(tmp_path: Path, registry: losskit.Registry) -> None:
    path = tmp_path / "many.yaml"
    path.write_text(
        "model:\n"
        "  losses:\n"
        "    - criterion: scaled_l2\n"
        "      weight: -1\n"
        "      scale: 'x'\n"
        "    - criterion: nope\n"
        "    - 7\n"
        "    - criterion: two_terms\n"
        "      b_from_epoch: -2\n"
        "      extra: 1\n"
    )
    found = problems(path, registry)
    assert found == [
        f"{path}:4: model.losses[0].weight: expected a float >= 0, got -1",
        f"{path}:5: model.losses[0].scale (scaled_l2): expected a float, got 'x' (a string)",
        f"{path}:6: model.losses[1].criterion: unknown criterion 'nope'; installed criteria: scaled_l2, two_terms",
        f"{path}:7: model.losses[2]: expected a mapping with a 'criterion' key, got 7 (an int)",
        f"{path}:9: model.losses[3].b_from_epoch (two_terms): -2 is out of range; allowed: >= 0",
        f"{path}:10: model.losses[3] (two_terms): unknown field 'extra' (valid fields: b_from_epoch)",
    ]
    with pytest.raises(losskit.ConfigError) as info:
        losskit.load_config(path, registry=registry)
    first_line = str(info.value).splitlines()[0]
    assert first_line == "invalid loss config: 6 problems"


def test_mapping_source_reports_paths_without_lines(registry: losskit.Registry) -> None:
    msg = one_problem({"losses": [{"criterion": "scaled_l2", "gamma": -1}]}, registry)
    assert msg == "losses[0].gamma (scaled_l2): -1 is out of range; allowed: >= 0"


def test_unsupported_source_type(registry: losskit.Registry) -> None:
    assert "got int" in one_problem(12, registry)


def test_cross_field_validate_hook() -> None:
    from dataclasses import dataclass
    from typing import Any

    class Ranged(losskit.Criterion):
        name = "ranged"

        @dataclass(frozen=True)
        class Config:
            low: float = losskit.option(0.4, doc="low")
            high: float = losskit.option(0.5, doc="high")

            def validate(self) -> list[tuple[str, str]]:
                if self.low > self.high:
                    return [("low", f"must be <= high ({self.high}), got {self.low}")]
                return []

        def forward(self, out: Any, target: Any) -> Any:
            return out["pred"].sum()

    reg = losskit.Registry(autoload=False)
    reg.register(Ranged)
    msg = one_problem([{"criterion": "ranged", "low": 0.9}], reg)
    assert msg == "[0].low (ranged): must be <= high (0.5), got 0.9"
    with pytest.raises(losskit.ConfigError, match=r"^ranged\.low: must be <= high"):
        Ranged(low=0.9)


def test_constructor_validates_like_the_config(criteria: dict) -> None:
    with pytest.raises(losskit.ConfigError) as info:
        criteria["scaled_l2"](scale=-1.0, gama=1.0)
    text = str(info.value)
    assert "scaled_l2.scale: -1 is out of range; allowed: [0, 10]" in text
    assert "scaled_l2.gama: unknown field 'gama'; did you mean 'gamma'?" in text
    crit = criteria["scaled_l2"](scale=2.0)
    assert crit.config.scale == 2.0
    assert math.isclose(criteria["scaled_l2"](crit.config, mode="sum").config.scale, 2.0)
