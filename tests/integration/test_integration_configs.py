# SPDX-License-Identifier: Apache-2.0
"""Everything installed: every file in configs/ builds and runs; the CLI main job; first-party discovery."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import losskit
from losskit.cli import main
from losskit.registry import FIRST_PARTY

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SEED = """\
model:
  losses:
    - criterion: cross_entropy
      label_smoothing: 0.1
      weight: ~
"""


def test_a_config_per_plugin() -> None:
    names = {p.stem for p in CONFIGS}
    assert {
        "classification",
        "detection-yolox",
        "detection-retinanet",
        "segmentation-pidnet",
        "detection-detr",
        "pose-rtmcc",
        "detection-yolov9",
        "segmentation",
    } <= names


def _leaves(out):
    """Model outputs that require grad, also inside lists and dicts (DETR's aux sets)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.requires_grad else []
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else ()
    return [t for v in items for t in _leaves(v)]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_builds_and_runs(path: Path) -> None:
    loss = losskit.build_losses(path)
    generator = torch.Generator().manual_seed(0)
    values, leaves = {}, []
    for name in loss:
        out, target = loss[name].example(2, generator=generator)
        leaves += _leaves(out)
        values[name] = loss[name](out, target)
    result = loss.combine(values)
    assert torch.isfinite(result.total)
    assert result.parts["total"] == result.total.detach()
    result.total.backward()
    assert leaves
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


def test_check_accepts_every_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", *map(str, CONFIGS)]) == 0
    assert capsys.readouterr().out.count(": ok: ") == len(CONFIGS)


def test_main_job_from_the_readme() -> None:
    exe = Path(sys.executable).with_name("losskit")
    result = subprocess.run(
        [str(exe), "run", str(ROOT / "configs" / "detection-yolox.yaml"), "--iters", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "yolox_loss/iou" in result.stdout
    assert "gradients finite" in result.stdout


def test_seed_example_loads_unchanged() -> None:
    cfg = losskit.load_config(SEED)
    (entry,) = cfg.entries
    assert (entry.criterion, entry.weight, entry.config.label_smoothing) == ("cross_entropy", 1.0, 0.1)


def test_every_first_party_criterion_is_installed_with_its_distribution() -> None:
    registry = losskit.Registry()
    assert registry.failures == []
    for name, dist in FIRST_PARTY.items():
        info = registry.get(name)
        assert info.distribution == dist
        assert info.version == "0.1.0"


def test_list_shows_all(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name, dist in FIRST_PARTY.items():
        assert name in out
        assert f"{dist} 0.1.0" in out
