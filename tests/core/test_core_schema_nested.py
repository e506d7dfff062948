# SPDX-License-Identifier: Apache-2.0
"""Nested config fields: a field whose type is another config dataclass, given as a mapping in YAML."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import pytest
import torch
import yaml

import losskit
from losskit.cli import main
from losskit.docgen import render_markdown, render_text
from losskit.schema import describe_fields


@dataclass(frozen=True)
class Costs:
    cost_class: float = losskit.option(2.0, ge=0.0, doc="Class cost weight.")
    cost_bbox: float = losskit.option(5.0, ge=0.0, doc="L1 cost weight.")


COSTS = Costs()


@dataclass(frozen=True)
class Matcher:
    type: Literal["HungarianMatcher"] = losskit.option("HungarianMatcher", doc="The matcher.")
    weight_dict: Costs = losskit.option(COSTS, doc="Cost weights.")
    alpha: float = losskit.option(0.25, ge=0.0, le=1.0, doc="Focal alpha of the class cost.")

    def validate(self) -> list[tuple[str, str]]:
        if self.weight_dict.cost_class == 0 and self.weight_dict.cost_bbox == 0:
            return [("weight_dict", "at least one cost must be > 0")]
        return []


MATCHER = Matcher(alpha=0.5)


class Nested(losskit.Criterion):
    """A criterion with a nested matcher config."""

    name = "nested_cfg"

    @dataclass(frozen=True)
    class Config:
        scale: float = losskit.option(1.0, ge=0.0, doc="Multiplier.")
        matcher: Matcher = losskit.option(MATCHER, doc="Matcher settings.")

    def forward(self, out: Any, target: Any) -> torch.Tensor:
        return out["pred"].sum() * self.config.scale

    def example(self, batch_size: int = 2, *, device: Any = None, generator: Any = None) -> Any:
        return {"pred": torch.ones(batch_size, requires_grad=True)}, {}


@pytest.fixture
def registry() -> losskit.Registry:
    reg = losskit.Registry(autoload=False)
    reg.register(Nested)
    return reg


def load(text: str, registry: losskit.Registry) -> Any:
    (entry,) = losskit.load_config(text, registry=registry).entries
    return entry.config


def problems(text: str, registry: losskit.Registry) -> list[str]:
    with pytest.raises(losskit.ConfigError) as error:
        losskit.load_config(text, registry=registry)
    return [f"{p.path}: {p.message}" for p in error.value.problems]


def test_nested_mapping_loads_and_absent_keys_take_the_field_default(registry: losskit.Registry) -> None:
    cfg = load(
        "losses:\n  - criterion: nested_cfg\n    matcher:\n      weight_dict: {cost_class: 1}\n", registry
    )
    assert cfg.matcher == Matcher(weight_dict=Costs(cost_class=1.0, cost_bbox=5.0), alpha=0.5)
    assert isinstance(cfg.matcher.weight_dict.cost_class, float)
    assert load("losses: [{criterion: nested_cfg}]", registry).matcher == Matcher(alpha=0.5)


def test_unknown_nested_key_is_located_with_a_suggestion(registry: losskit.Registry) -> None:
    text = "losses:\n  - criterion: nested_cfg\n    matcher:\n      weight_dict: {cost_clas: 1}\n"
    assert problems(text, registry) == [
        "losses[0].matcher.weight_dict.cost_clas: unknown key 'cost_clas'; did you mean 'cost_class'? "
        "(valid keys: cost_class, cost_bbox)"
    ]


def test_every_nested_problem_is_reported_with_its_path(registry: losskit.Registry) -> None:
    text = (
        "losses:\n  - criterion: nested_cfg\n    scale: -1\n    matcher:\n      type: Hungarian\n"
        "      alpha: 2\n      weight_dict: {cost_bbox: x}\n"
    )
    got = problems(text, registry)
    assert len(got) == 4
    assert got[0].startswith("losses[0].scale: -1 is out of range")
    assert got[1] == (
        "losses[0].matcher.type: got 'Hungarian' (a string); did you mean 'HungarianMatcher'?; "
        "allowed: 'HungarianMatcher'"
    )
    assert got[2] == "losses[0].matcher.alpha: 2 is out of range; allowed: [0, 1]"
    assert got[3] == "losses[0].matcher.weight_dict.cost_bbox: expected a float, got 'x' (a string)"


def test_a_non_mapping_and_the_nested_validate_hook(registry: losskit.Registry) -> None:
    assert problems("losses: [{criterion: nested_cfg, matcher: 3}]", registry) == [
        "losses[0].matcher: expected a mapping with keys type, weight_dict, alpha, got 3"
    ]
    text = "losses: [{criterion: nested_cfg, matcher: {weight_dict: {cost_class: 0, cost_bbox: 0}}}]"
    assert problems(text, registry) == ["losses[0].matcher.weight_dict: at least one cost must be > 0"]


def test_keyword_arguments_and_instances(registry: losskit.Registry) -> None:
    crit = Nested(matcher={"alpha": 0.1})
    assert crit.config.matcher == Matcher(alpha=0.1)
    again = Nested(crit.config, scale=2.0)  # re-validated from the instance (nested as dicts)
    assert again.config.matcher == Matcher(alpha=0.1) and again.config.scale == 2.0
    assert Nested(matcher=Matcher(alpha=0.3)).config.matcher.alpha == 0.3
    with pytest.raises(losskit.ConfigError, match=r"nested_cfg\.matcher\.weight_dict\.cost_bbox: -1"):
        Nested(matcher={"weight_dict": {"cost_bbox": -1}})
    assert "matcher=" in repr(crit) and "matcher=" not in repr(Nested())


def test_described_with_dotted_rows_and_rendered_as_valid_yaml(
    registry: losskit.Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = {f.name: f for f in describe_fields(Nested.Config)}
    assert list(rows) == [
        "scale",
        "matcher",
        "matcher.type",
        "matcher.weight_dict",
        "matcher.weight_dict.cost_class",
        "matcher.weight_dict.cost_bbox",
        "matcher.alpha",
    ]
    assert rows["matcher"].nested and rows["matcher"].type == "mapping"
    assert rows["matcher"].default == {
        "type": "HungarianMatcher",
        "weight_dict": {"cost_class": 2.0, "cost_bbox": 5.0},
        "alpha": 0.5,
    }
    assert rows["matcher.alpha"].default == 0.5  # the field's default, not Matcher's own
    info = registry.get("nested_cfg")
    page = render_markdown(info)
    assert "| `matcher.weight_dict.cost_class` | float | `2.0` | >= 0 | Class cost weight. |" in page
    example = page.split("```yaml\n", 1)[1].split("```", 1)[0]
    parsed = yaml.safe_load(example)
    entry = parsed["model"]["losses"][0]
    assert entry["matcher"] == rows["matcher"].default
    assert load(example, registry) == Nested.Config()  # the example loads back to the defaults
    text = render_text(info)
    assert "matcher.weight_dict.cost_bbox" in text
    assert main(["describe", "nested_cfg"], registry=registry) == 0
    assert "matcher.type" in capsys.readouterr().out


@dataclass(frozen=True)
class _WithRequired:
    sizes: tuple[float, ...] | None = losskit.option(
        None, gt=0.0, required=True, example=(8.0, 16.0), doc="Anchor sizes in pixels."
    )
    scale: float = losskit.option(1.0, doc="A scale.")


def test_required_field_is_reported_with_its_example_and_documented() -> None:
    from losskit.docgen import _default_cell, _yaml_lines
    from losskit.schema import describe_fields, required_examples, validate_config

    for values in ({}, {"sizes": None}):
        problems: list[tuple[str, str]] = []
        report = problems.append
        assert validate_config(_WithRequired, values, report=lambda f, m, add=report: add((f, m))) is None
        assert problems == [("sizes", "required: anchor sizes in pixels; e.g. sizes: [8.0, 16.0]")]
    ok = validate_config(_WithRequired, {"sizes": [4, 5]}, report=lambda f, m: None)
    assert ok == _WithRequired(sizes=(4.0, 5.0))
    assert required_examples(_WithRequired) == {"sizes": [8.0, 16.0]}
    fields = describe_fields(_WithRequired)
    assert [_default_cell(f) for f in fields] == ["required", "1.0"]
    assert _yaml_lines(fields, "") == ["sizes: [8.0, 16.0]", "scale: 1.0"]
    with pytest.raises(TypeError, match="required=True"):
        losskit.option(1.0, required=True, example=2.0, doc="x")


@dataclass(frozen=True)
class _WithRejected:
    rejected_fields: ClassVar[dict[str, str]] = {"old": "{key} is gone (got {value!r}); use 'new'"}
    new: int = losskit.option(1, doc="The new field.")


def test_rejected_keys_get_their_own_message() -> None:
    from losskit.schema import describe_fields, validate_config

    problems: list[tuple[str, str]] = []
    report = problems.append
    assert validate_config(_WithRejected, {"old": 3}, report=lambda f, m: report((f, m))) is None
    assert problems == [("old", "old is gone (got 3); use 'new'")]
    assert [f.name for f in describe_fields(_WithRejected)] == ["new"]
