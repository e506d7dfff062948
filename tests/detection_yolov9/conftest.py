# SPDX-License-Identifier: Apache-2.0
"""Makes the helper modules of these tests (``yolov9_cases``, ``yolov9_reference``) importable, also in
the processes that the data-parallel test spawns (spawn passes ``sys.path`` on)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)


def pytest_collection_modifyitems(items: list) -> None:
    """``float(term)`` on a term that requires grad is fine in these tests; silence torch's warning."""
    for item in items:
        if str(item.fspath).startswith(HERE):
            item.add_marker(pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad"))


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: on a shared, oversubscribed machine OpenMP's barriers make each small op
    take tens of milliseconds with more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
