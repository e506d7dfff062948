# SPDX-License-Identifier: Apache-2.0
"""The committed criterion reference (docs/reference) matches the schemas; `nox -s docs` regenerates it."""

from __future__ import annotations

from pathlib import Path

import losskit
from losskit._refdocs import expected_pages
from losskit.registry import FIRST_PARTY

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "reference"


def test_reference_is_fresh() -> None:
    pages = expected_pages(losskit.get_registry())
    assert len(pages) == len(FIRST_PARTY) + 1  # every first-party criterion and the index
    stale = [
        name
        for name, text in pages.items()
        if not (REFERENCE / name).is_file() or (REFERENCE / name).read_text() != text
    ]
    assert stale == [], f"stale reference pages {stale}: run `nox -s docs`"
    extra = sorted(p.name for p in REFERENCE.glob("*.md") if p.name not in pages)
    assert extra == [], f"pages for criteria that no longer exist: {extra}"
