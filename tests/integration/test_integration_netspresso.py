# SPDX-License-Identifier: Apache-2.0
"""docs/migrating-from-netspresso.md: its training loop runs, as written, on every file in configs/.

The configs are loaded with OmegaConf (with an interpolated weight, as a Hydra/OmegaConf trainer holds
them); the data are each criterion's ``example()`` batches; the "model" shifts those outputs by a learnt
scalar so that the loop has a parameter to train. No NetsPresso install is needed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import losskit

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "migrating-from-netspresso.md"
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def loop_code() -> str:
    """The page's training-loop block (the Python block under '## The training loop')."""
    section = PAGE.read_text().split("## The training loop", 1)[1]
    match = re.search(r"```python\n(.*?)```\n", section, flags=re.S)
    assert match is not None, "docs/migrating-from-netspresso.md lost its training loop"
    return match.group(1)


def _trainable(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.requires_grad
    return isinstance(value, list) and bool(value) and all(_trainable(v) for v in value)


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return [_detach(v) for v in value]
    return value


class Shift(nn.Module):
    """Stands in for a model: adds one learnt scalar to every model output of a recorded batch."""

    def __init__(self, keys: set[str]) -> None:
        super().__init__()
        self.keys = keys
        self.shift = nn.Parameter(torch.zeros(()))

    def _apply_shift(self, value: Any) -> Any:
        return [self._apply_shift(v) for v in value] if isinstance(value, list) else value + self.shift

    def forward(self, images: Mapping[str, Any]) -> dict[str, Any]:
        return {k: self._apply_shift(v) if k in self.keys else v for k, v in images.items()}


def batches(loss: losskit.CompositeLoss, count: int) -> tuple[list[tuple[dict[str, Any], Any]], set[str]]:
    """``count`` batches that every criterion of ``loss`` accepts, built from their ``example()``."""
    generator = torch.Generator().manual_seed(0)
    data = []
    keys: set[str] = set()
    for _ in range(count):
        out: dict[str, Any] = {}
        target: dict[str, Any] = {}
        for name in loss:
            o, t = loss[name].example(2, generator=generator)
            keys |= {k for k, v in o.items() if _trainable(v)}
            for k, v in o.items():
                out.setdefault(k, _detach(v))
            for k, v in t.items():
                target.setdefault(k, v)
        data.append((out, target))
    return data, keys


def interpolated(path: Path, folder: Path) -> Path:
    """``path`` as a trainer's OmegaConf file: every weight becomes ``${train.loss_weight}``."""
    conf = OmegaConf.load(path)
    conf.train = {"loss_weight": 0.5}
    for entry in conf.model.losses:
        entry.weight = "${train.loss_weight}"
    out = folder / path.name
    OmegaConf.save(conf, out)
    assert "${train.loss_weight}" in out.read_text()
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_page_loop_runs_on_every_config(path: Path, tmp_path: Path) -> None:
    probe = losskit.build_losses(path)
    loader, keys = batches(probe, count=2)
    assert keys, "no example output requires grad"
    model = Shift(keys)
    logged: list[tuple[int, dict[str, float]]] = []
    namespace: dict[str, Any] = {
        "config_path": str(interpolated(path, tmp_path)),
        "device": torch.device("cpu"),
        "model": model,
        "loader": loader,
        "optimizer": torch.optim.SGD(model.parameters(), lr=1e-3),
        "start_epoch": 1,
        "epochs": 2,
        "log": lambda epoch, values: logged.append((epoch, values)),
    }
    exec(compile(loop_code(), str(PAGE), "exec"), namespace)

    loss: losskit.CompositeLoss = namespace["loss"]
    assert list(loss) == list(probe)
    assert set(loss.weights.values()) == {0.5}  # the interpolated weight, resolved
    assert [epoch for epoch, _ in logged] == [1, 2]
    assert all(loss[name].epoch == 2 for name in loss)  # set_epoch reached every criterion
    for _, values in logged:
        assert set(values) >= {"total", *loss}
        assert all(math.isfinite(v) for v in values.values())
        expected = sum(0.5 * values[name] for name in loss)
        assert values["total"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert model.shift.grad is not None and torch.isfinite(model.shift.grad)
    assert float(model.shift.detach()) != 0.0  # the optimizer stepped


def test_cur_epoch_keyword_says_what_to_do() -> None:
    """The NetsPresso call, ``build_losses(conf.model, cur_epoch=...)``, explains ``set_epoch``."""
    conf = OmegaConf.load(ROOT / "configs" / "detection-yolox.yaml")
    with pytest.raises(losskit.ConfigError, match=r"call `loss\.set_epoch\(epoch\)` each epoch"):
        losskit.build_losses(conf.model, cur_epoch=1)


def test_logging_keys_table_matches_the_criteria() -> None:
    """Each row of the page's logging-keys table lists what the criterion actually returns."""
    section = PAGE.read_text().split("## Logging keys", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:4] for line in section.splitlines() if line.startswith("| `")]
    names = [cell.strip().strip("`") for cell, _, _ in rows]
    assert set(names) >= {"cross_entropy", "focal_loss", "yolox_loss", "retinanet_loss", "pidnet_loss"}
    registry = losskit.Registry()
    for name, (_, parts, diagnostics) in zip(names, rows):
        cls = registry.get(name).cls
        try:
            criterion = cls()
            terms, diags = criterion.term_names(), criterion.diagnostic_names()
        except losskit.ConfigError:  # a required field (yolofastest_loss's anchors): the declared names
            terms, diags = cls.terms, cls.diagnostics
        parts = re.sub(r"\(.*?\)", "", parts)  # a note in parentheses: terms another config adds
        assert re.findall(r"`([\w/]+)`", parts) == [name, *(f"{name}/{t}" for t in terms)]
        assert re.findall(r"`([\w/]+)`", diagnostics) == [f"{name}/{d}" for d in diags]
