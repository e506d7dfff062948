# SPDX-License-Identifier: Apache-2.0
"""The yolox tests' own warning filter (helper modules and threads: ``tests/conftest.py``)."""

from __future__ import annotations

from pathlib import Path

HERE = str(Path(__file__).resolve().parent)


def pytest_collection_modifyitems(items: list) -> None:
    """``float(term)`` on a term that requires grad is fine in these tests; silence torch's warning."""
    import pytest

    for item in items:
        if str(item.fspath).startswith(HERE):
            item.add_marker(pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad"))
