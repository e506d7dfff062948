# SPDX-License-Identifier: Apache-2.0
"""The ``losskit`` command: list, describe, check, run, with exit codes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import losskit
from losskit.cli import main

GOOD = "model:\n  losses:\n    - criterion: scaled_l2\n      scale: 0.5\n    - {criterion: two_terms, weight: 2.0}\n"
BAD = "model:\n  losses:\n    - criterion: scaled_l2\n      scael: 0.5\n    - {criterion: two_terms, weight: -2}\n"


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(GOOD)
    bad.write_text(BAD)
    return good, bad


def test_list(registry: losskit.Registry, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"], registry=registry) == 0
    out = capsys.readouterr().out
    assert "scaled_l2" in out and "plugin '<code>'" in out and "Mean squared error times a scale" in out


def test_list_real_plugin_shows_distribution_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"], registry=losskit.Registry()) == 0
    out = capsys.readouterr().out
    assert re.search(
        r"^charbonnier_loss +losskit-charbonnier 0\.3\.0 +Charbonnier \(robust L1\) loss", out, re.M
    )


def test_describe(registry: losskit.Registry, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["describe", "scaled_l2"], registry=registry) == 0
    out = capsys.readouterr().out
    assert "scale" in out and "[0, 10]" in out and "Multiplier." in out
    assert "out['pred']: (N, *) float" in out and "target['target']: (N, *) float" in out
    assert main(["describe", "two_terms"], registry=registry) == 0
    out = capsys.readouterr().out
    assert "terms: a, b" in out and "diagnostics: count, b_active" in out


def test_describe_markdown(registry: losskit.Registry, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["describe", "scaled_l2", "--format", "markdown"], registry=registry) == 0
    out = capsys.readouterr().out
    assert out.startswith("# `scaled_l2`")
    assert "| `scale` | float | `1.0` | [0, 10] | Multiplier. |" in out
    assert "    - criterion: scaled_l2\n      weight: ~\n      scale: 1.0\n" in out


def test_describe_unknown(registry: losskit.Registry, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["describe", "scaled_l3"], registry=registry) == 1
    assert (
        "losskit: error: unknown criterion 'scaled_l3'; did you mean 'scaled_l2'?" in capsys.readouterr().err
    )


def test_check(
    files: tuple[Path, Path], registry: losskit.Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    good, bad = files
    assert main(["check", str(good)], registry=registry) == 0
    assert f"{good}: ok: scaled_l2 (x1), two_terms (x2)" in capsys.readouterr().out
    assert main(["check", str(good), str(bad)], registry=registry) == 1
    out = capsys.readouterr().out
    assert f"{bad}: invalid (2 problems)" in out
    assert f"{bad}:4: model.losses[0] (scaled_l2): unknown field 'scael'; did you mean 'scale'?" in out
    assert f"{bad}:5: model.losses[1].weight: expected a float >= 0, got -2" in out


def test_check_missing_file(registry: losskit.Registry, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "missing.yaml"], registry=registry) == 1
    assert "config file not found: 'missing.yaml'" in capsys.readouterr().out


def test_run(
    files: tuple[Path, Path], registry: losskit.Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    good, _ = files
    assert main(["run", str(good), "--iters", "3", "--epoch", "1"], registry=registry) == 0
    out = capsys.readouterr().out
    assert "iterations: 3" in out
    for key in ("scaled_l2", "two_terms/a", "two_terms/b", "total", "two_terms/count"):
        assert f"\n{key} " in out
    assert "ms/iter" in out and "gradients finite" in out
    assert "\r" not in out  # no progress bar when stdout is not a terminal


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--iters", "0"], "--iters: expected an int >= 1, got 0"),
        (["--device", "cuda:0"], "requested but CUDA is not available"),
        (["--device", "nonsense"], "--device:"),
    ],
)
def test_run_bad_arguments(
    args: list[str],
    message: str,
    files: tuple[Path, Path],
    registry: losskit.Registry,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if "cuda" in args[-1]:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")  # only reached on GPU machines
    assert main(["run", str(files[0]), *args], registry=registry) == 1
    assert message in capsys.readouterr().err


def test_run_invalid_config(
    files: tuple[Path, Path], registry: losskit.Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", str(files[1])], registry=registry) == 1
    assert "invalid loss config: 2 problems" in capsys.readouterr().err


def test_usage_error_exit_code() -> None:
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2


def test_console_script_is_installed(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("losses:\n  - criterion: charbonnier_loss\n    eps: 0.01\n")
    exe = Path(sys.executable).with_name("losskit")
    result = subprocess.run([str(exe), "run", str(config), "--iters", "2"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "charbonnier_loss" in result.stdout
    result = subprocess.run(
        [str(exe), "check", str(config), str(tmp_path / "no.yaml")], capture_output=True, text=True
    )
    assert result.returncode == 1
    result = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
    assert result.stdout.strip() == f"losskit {losskit.__version__}"


def test_run_shows_a_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    import os
    import pty

    config = tmp_path / "c.yaml"
    config.write_text("losses:\n  - criterion: charbonnier_loss\n")
    exe = Path(sys.executable).with_name("losskit")
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(
            [str(exe), "run", str(config), "--iters", "4"],
            stdout=follower,
            stderr=subprocess.PIPE,
            timeout=120,
        )
        os.close(follower)
        chunks = []
        while True:
            try:
                data = os.read(leader, 4096)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(leader)
    text = b"".join(chunks).decode()
    assert proc.returncode == 0, proc.stderr
    assert "] 4/4" in text and "#" * 30 in text
    assert "charbonnier_loss" in text
