# SPDX-License-Identifier: Apache-2.0
"""The test tree follows its own conventions (tests/conftest.py): helper module names, no path hacks."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
FOLDERS = sorted(
    p for p in TESTS.iterdir() if p.is_dir() and p.name != "plugins" and not p.name.startswith((".", "_"))
)


def prefixes(folder: Path) -> set[str]:
    """The prefixes of a folder's test files: ``test_<prefix>_*.py`` (or ``test_<prefix>.py``); one per
    criterion family (``detection_yolox`` holds ``yolox`` and ``yolofastest``)."""
    return {
        m.group(1) for p in folder.glob("test_*.py") if (m := re.match(r"test_([a-z0-9]+)(_|\.py$)", p.name))
    }


def test_prefixes_are_unique_across_folders() -> None:
    found = [p for folder in FOLDERS for p in prefixes(folder)]
    assert len(found) == len(set(found)), sorted(found)


def test_helper_modules_follow_the_naming_scheme() -> None:
    """``<prefix>_cases.py`` and ``<prefix>_reference.py`` only: unique names on the shared sys.path."""
    wrong = []
    for folder in FOLDERS:
        allowed = {"conftest.py"} | {
            f"{p}_{role}.py" for p in prefixes(folder) for role in ("cases", "reference")
        }
        wrong += [
            f"{folder.name}/{p.name}"
            for p in folder.glob("*.py")
            if not p.name.startswith("test_") and p.name not in allowed
        ]
    assert wrong == [], f"rename to <prefix>_cases.py / <prefix>_reference.py: {wrong}"


def test_test_modules_leave_sys_path_alone() -> None:
    """Test files and helper modules never change sys.path: tests/conftest.py puts every folder there.

    (A folder's conftest.py doing it too is redundant, not wrong; only tests/conftest.py needs to.)
    """
    offenders = [
        str(p.relative_to(TESTS))
        for folder in FOLDERS
        for p in folder.rglob("*.py")
        if p.name != "conftest.py"
        and re.search(r"sys\.path\.(insert|append|extend)\(|sys\.path \+?=", p.read_text())
    ]
    assert offenders == [], f"import helper modules by name instead (tests/conftest.py): {offenders}"
