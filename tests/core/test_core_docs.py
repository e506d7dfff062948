# SPDX-License-Identifier: Apache-2.0
"""The plugin guide shows the example plugin exactly as it is installed and tested."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "writing-a-plugin.md"
PLUGIN = ROOT / "tests" / "plugins" / "losskit-charbonnier"


def blocks() -> dict[str, str]:
    text = GUIDE.read_text()
    return dict(re.findall(r"`([\w/.\-]+)`:\n\n```\w+\n(.*?)```\n", text, flags=re.S))


@pytest.mark.parametrize(
    "rel",
    [
        "pyproject.toml",
        "src/losskit_charbonnier/charbonnier.py",
        "src/losskit_charbonnier/plugin.py",
        "src/losskit_charbonnier/__init__.py",
    ],
)
def test_guide_matches_example_plugin(rel: str) -> None:
    assert blocks()[rel] == (PLUGIN / rel).read_text(), f"docs/writing-a-plugin.md is out of date for {rel}"
