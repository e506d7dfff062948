# SPDX-License-Identifier: Apache-2.0
"""Reference documentation generated from criterion schemas (``docs/reference/<name>.md``)."""

from __future__ import annotations

import inspect
from typing import Any

import yaml

from losskit.registry import CriterionInfo
from losskit.schema import FieldInfo, describe_fields

__all__ = ["render_markdown", "render_text", "yaml_value"]


def yaml_value(value: Any) -> str:
    """A value as it is written in a YAML config (``~`` for null, flow style for lists)."""
    if value is None:
        return "~"
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=1000, sort_keys=False).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def _default_cell(f: FieldInfo) -> str:
    """The default as shown in a table: a nested mapping points at its keys' rows."""
    if f.required:
        return "required"
    return "(the keys below)" if f.nested else yaml_value(f.default)


def _yaml_lines(fields: list[FieldInfo], indent: str) -> list[str]:
    """``key: default`` lines of the top-level fields; nested mappings in block style."""
    lines = []
    for f in fields:
        if "." in f.name:
            continue
        if f.nested:
            block = yaml.safe_dump({f.name: f.default}, default_flow_style=False, sort_keys=False)
            lines += [indent + line for line in block.rstrip("\n").split("\n")]
        else:
            lines.append(f"{indent}{f.name}: {yaml_value(f.example if f.required else f.default)}")
    return lines


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _description(info: CriterionInfo) -> str:
    doc = inspect.cleandoc(info.cls.__doc__ or "")
    return doc


def render_markdown(info: CriterionInfo) -> str:
    """The reference page of one criterion: summary, fields, inputs, terms and a YAML example."""
    cls = info.cls
    fields = describe_fields(cls.Config)
    lines = [f"# `{info.name}`", ""]
    doc = _description(info)
    if doc:
        lines += [doc, ""]
    if info.distribution:
        lines += [f"Provided by `{info.distribution}` (`pip install {info.distribution}`).", ""]
    lines += ["## Fields", ""]
    lines += ["| field | type | default | allowed | description |", "|---|---|---|---|---|"]
    lines.append(
        "| `weight` | float | `~` (1.0) | >= 0 | Coefficient of this criterion in the weighted sum. |"
    )
    lines.append(
        f"| `name` | str | `{info.name}` | letters, digits, `_`, `-` | Key the loss is logged under; "
        "must be unique in the config. |"
    )
    for f in fields:
        lines.append(
            f"| `{f.name}` | {_md_escape(f.type)} | `{_md_escape(_default_cell(f))}` | "
            f"{_md_escape(f.allowed) or 'any'} | {_md_escape(f.doc)} |"
        )
    lines += ["", "## Inputs", "", "| key | expected |", "|---|---|"]
    for key, desc in cls.inputs.items():
        lines.append(f"| `out[{key!r}]` | {_md_escape(desc)} |")
    for key, desc in cls.targets.items():
        lines.append(f"| `target[{key!r}]` | {_md_escape(desc)} |")
    lines += ["", "## Result", ""]
    if cls.terms:
        lines.append("Terms (their sum is the loss): " + ", ".join(f"`{t}`" for t in cls.terms) + ".")
    else:
        lines.append("A scalar tensor.")
    if cls.diagnostics:
        lines.append("")
        lines.append("Diagnostics (not loss terms): " + ", ".join(f"`{d}`" for d in cls.diagnostics) + ".")
    lines += [
        "",
        "## Example",
        "",
        "```yaml",
        "model:",
        "  losses:",
        f"    - criterion: {info.name}",
        "      weight: ~",
    ]
    lines += _yaml_lines(fields, "      ")
    lines += ["```", ""]
    return "\n".join(lines)


def render_text(info: CriterionInfo) -> str:
    """``losskit describe`` output: fields with type, default, range and doc, and expected keys."""
    cls = info.cls
    fields = describe_fields(cls.Config)
    out = [f"{info.name} ({info.provider})"]
    summary = info.summary
    if summary:
        out.append(f"  {summary}")
    out += ["", "fields:"]
    rows = [("weight", "float", "~ (1.0)", ">= 0", "coefficient of this criterion in the weighted sum")]
    rows.append(("name", "str", info.name, "unique", "key the loss is logged under"))
    rows += [(f.name, f.type, _default_cell(f), f.allowed or "any", f.doc) for f in fields]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        out.append("  " + "  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4])
    out += ["", "inputs:"]
    for key, desc in cls.inputs.items():
        out.append(f"  out[{key!r}]: {desc}")
    for key, desc in cls.targets.items():
        out.append(f"  target[{key!r}]: {desc}")
    out += ["", "terms: " + (", ".join(cls.terms) if cls.terms else "(a scalar)")]
    if cls.diagnostics:
        out.append("diagnostics: " + ", ".join(cls.diagnostics))
    return "\n".join(out)
