# SPDX-License-Identifier: Apache-2.0
"""Fixtures for the core tests: small criteria registered in injected registries (no global state)."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
import torch

import losskit
from losskit.checks import get_tensor


class ScaledL2(losskit.Criterion):
    """Mean squared error times a scale; a scalar criterion."""

    name = "scaled_l2"
    inputs = {"pred": "(N, *) float"}
    targets = {"target": "(N, *) float"}

    @dataclass(frozen=True)
    class Config:
        scale: float = losskit.option(1.0, ge=0.0, le=10.0, doc="Multiplier.")
        gamma: float = losskit.option(2.0, ge=0.0, doc="Unused exponent (for field tests).")
        mode: Literal["mean", "sum"] = losskit.option("mean", doc="Reduction.")
        class_weights: tuple[float, ...] | None = losskit.option(None, ge=0.0, doc="Per-class weights.")
        steps: int = losskit.option(3, ge=1, doc="An int field.")
        flag: bool = losskit.option(False, doc="A bool field.")

    def forward(self, out: Any, target: Any) -> torch.Tensor:
        pred = get_tensor(out, "pred", criterion=self.name, side="out", expected="(N, *) float")
        tgt = get_tensor(target, "target", criterion=self.name, side="target", expected="(N, *) float")
        diff = (pred - tgt).square()
        return self.config.scale * (diff.mean() if self.config.mode == "mean" else diff.sum())

    def example(self, batch_size: int = 2, *, device: Any = None, generator: Any = None) -> Any:
        pred = torch.randn(batch_size, 4, generator=generator).to(device).requires_grad_()
        return {"pred": pred}, {"target": torch.zeros(batch_size, 4).to(device)}


class TwoTerms(losskit.Criterion):
    """Returns terms a (sum of pred) and b (epoch-gated), plus a count diagnostic."""

    name = "two_terms"
    terms = ("a", "b")
    diagnostics = ("count", "b_active")
    inputs = {"pred": "(N,) float"}

    @dataclass(frozen=True)
    class Config:
        b_from_epoch: int = losskit.option(1, ge=0, doc="Epoch from which b is on.")

    def __init__(self, config: Any = None, /, **fields: Any) -> None:
        super().__init__(config, **fields)
        self.register_buffer("offset", torch.tensor(0.5))

    def forward(self, out: Any, target: Any) -> losskit.LossTerms:
        pred = out["pred"]
        on = self.epoch >= self.config.b_from_epoch
        a = pred.sum()
        b = (2.0 * pred.sum() + self.offset) if on else pred.sum() * 0.0
        count = torch.tensor(float(pred.numel()))
        return losskit.LossTerms({"a": a, "b": b}, {"count": count, "b_active": torch.tensor(on)})

    def example(self, batch_size: int = 2, *, device: Any = None, generator: Any = None) -> Any:
        return {"pred": torch.ones(batch_size, device=device, requires_grad=True)}, {}


@pytest.fixture
def criteria() -> dict[str, type[losskit.Criterion]]:
    return {"scaled_l2": ScaledL2, "two_terms": TwoTerms}


@pytest.fixture
def registry() -> losskit.Registry:
    """A registry with no entry points and the two test criteria."""
    reg = losskit.Registry(autoload=False)
    reg.register(ScaledL2)
    reg.register(TwoTerms)
    return reg


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder on sys.path where tests write throwaway plugin modules."""
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def write_module(folder: Path, name: str, source: str) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def make_module(plugin_dir: Path) -> Any:
    def make(name: str, source: str) -> str:
        write_module(plugin_dir, name, source)
        return name

    return make
