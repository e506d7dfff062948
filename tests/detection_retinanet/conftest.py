# SPDX-License-Identifier: Apache-2.0
"""retinanet_loss tests: one intra-op thread per test.

The test machine's 2 cores are shared by several processes; torch's OpenMP threads spin-wait under
oversubscription and slow these CPU-bound tests by 10-20x. One thread is restored after each test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
