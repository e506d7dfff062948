# SPDX-License-Identifier: Apache-2.0
"""What every test folder needs: its helper modules importable, and one intra-op thread per test.

Helper modules. A test folder keeps the code its tests share in ``<prefix>_cases.py`` (batches,
workers for the data-parallel tests, small utilities) and, when it has one, an independent
re-implementation of the reference in ``<prefix>_reference.py``; ``<prefix>`` is the one its test files
use (``test_yolox_*.py`` → ``yolox_cases.py``; a folder may hold several criteria, each with its own
prefix), so the names are unique across folders. Tests import
them by name (``from yolox_cases import make_batch``), never through ``sys.path.insert``: pytest runs
with ``--import-mode=importlib``, which puts nothing on ``sys.path``, so every test folder is put there
once, here. The processes that ``losskit.testing.run_on_ranks`` spawns receive this ``sys.path`` too.

Threads. The test machines share few cores between several processes; torch's OpenMP threads
spin-wait under oversubscription and slow the CPU-bound tests many times over. Each test runs with one
intra-op thread; the previous count is restored afterwards.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
#: Folders under tests/ that hold no test modules of their own (installable example packages).
NOT_TEST_FOLDERS = ("plugins",)


def test_folders() -> list[Path]:
    """Every folder of tests directly under ``tests/``."""
    return sorted(
        p
        for p in TESTS.iterdir()
        if p.is_dir() and p.name not in NOT_TEST_FOLDERS and not p.name.startswith((".", "_"))
    )


for _folder in test_folders():
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
