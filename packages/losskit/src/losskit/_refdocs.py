# SPDX-License-Identifier: Apache-2.0
"""Write (or check) the generated criterion reference: ``python -m losskit._refdocs docs/reference [--check]``.

One page per installed first-party criterion plus an index. ``--check`` exits 1 and names the stale
pages instead of writing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from losskit.docgen import render_markdown
from losskit.registry import FIRST_PARTY, Registry, get_registry

__all__ = ["expected_pages", "main"]


def expected_pages(registry: Registry) -> dict[str, str]:
    """File name -> content for every installed first-party criterion, plus ``README.md``."""
    pages: dict[str, str] = {}
    index = [
        "# Criterion reference",
        "",
        "Generated from the criteria's schemas by `nox -s docs` (`python -m losskit._refdocs docs/reference`);",
        "do not edit by hand. `losskit describe NAME` prints the same information.",
        "",
        "| criterion | distribution | description |",
        "|---|---|---|",
    ]
    for info in registry:
        if info.name not in FIRST_PARTY or info.distribution != FIRST_PARTY[info.name]:
            continue
        pages[f"{info.name}.md"] = render_markdown(info)
        index.append(f"| [`{info.name}`]({info.name}.md) | `{info.distribution}` | {info.summary} |")
    pages["README.md"] = "\n".join(index) + "\n"
    return pages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m losskit._refdocs")
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--check", action="store_true", help="report stale pages; write nothing")
    args = parser.parse_args(argv)
    pages = expected_pages(get_registry())
    stale = [
        n
        for n, text in pages.items()
        if not (args.outdir / n).is_file() or (args.outdir / n).read_text() != text
    ]
    if args.check:
        for n in stale:
            print(f"stale: {args.outdir / n}; regenerate with `nox -s docs`")
        return 1 if stale else 0
    args.outdir.mkdir(parents=True, exist_ok=True)
    for n, text in pages.items():
        (args.outdir / n).write_text(text)
    print(f"wrote {len(pages)} pages to {args.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
