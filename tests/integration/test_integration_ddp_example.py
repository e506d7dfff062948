# SPDX-License-Identifier: Apache-2.0
"""examples/train_ddp.py runs under torchrun with 2 CPU ranks (gloo, loopback) and learns."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("extra", [[], ["--global-normalizer"]], ids=["local", "global-normalizer"])
def test_train_ddp_with_torchrun(extra: list[str]) -> None:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(ROOT / "examples" / "train_ddp.py"),
        "--config", str(ROOT / "configs" / "classification.yaml"), "--steps", "60", "--log-every", "20", *extra,
    ]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"world size 2: loss ([\d.]+) -> ([\d.]+); final accuracy ([\d.]+)", result.stdout)
    assert match, result.stdout
    first, last, accuracy = map(float, match.groups())
    assert last < 0.6 * first
    assert accuracy >= 0.9
