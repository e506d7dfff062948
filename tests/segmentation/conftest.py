# SPDX-License-Identifier: Apache-2.0
"""seg_cross_entropy tests: make ``seg_helpers`` importable; one intra-op thread per test.

Tests run with ``--import-mode=importlib``, which puts nothing on ``sys.path``; the helpers module (also
imported by spawned ``torch.distributed`` ranks) is found through this folder. The machine's cores are
shared, where OpenMP threads spin-wait, so each test runs with one thread (restored afterwards).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
