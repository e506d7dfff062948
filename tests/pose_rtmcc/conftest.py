# SPDX-License-Identifier: Apache-2.0
"""Makes the helper module of these tests (``rtmcc_reference``) importable, also in the processes that the
data-parallel test spawns (spawn passes ``sys.path`` on)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)


def pytest_collection_modifyitems(items: list) -> None:
    """``float(term)`` on a term that requires grad is fine in these tests; silence torch's warning."""
    import pytest

    for item in items:
        if str(item.fspath).startswith(HERE):
            item.add_marker(pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad"))
