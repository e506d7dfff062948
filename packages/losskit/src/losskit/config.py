# SPDX-License-Identifier: Apache-2.0
"""Loss-config loader (YAML, or any mapping or sequence such as OmegaConf's) with precise, complete
error reports.

Accepted layouts (all equivalent)::

    model: {losses: [...]}      # NetsPresso Trainer layout; other top-level keys are ignored
    losses: [...]
    [...]                       # a bare list of entries

Each entry: ``criterion`` (required), ``weight`` (float >= 0, null/absent = 1.0), ``name`` (optional, the
key it is logged under; default the criterion name; unique), and the criterion's own fields.
YAML is read with a safe loader: tags such as ``!!python/object`` are rejected. Mappings and sequences
(OmegaConf and Hydra configs included) are read by :mod:`losskit._containers`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from losskit._containers import UNRESOLVED, ContainerReader, TooLarge, is_sequence, root_path
from losskit.errors import ConfigError, CriterionConflictError, Problem
from losskit.registry import CriterionInfo, Registry, get_registry
from losskit.schema import field_names, validate_config

__all__ = ["LossConfig", "LossEntry", "load_config"]

RESERVED = ("criterion", "weight", "name")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
_MAX_NODES = 100_000
TOP = "(top level)"
_PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")

PathKey = tuple[str | int, ...]


@dataclass(frozen=True)
class LossEntry:
    """One validated loss entry."""

    name: str
    criterion: str
    weight: float
    config: Any
    info: CriterionInfo
    path: str

    def build(self) -> Any:
        """Instantiate the criterion with its validated config."""
        return self.info.cls(self.config)


@dataclass
class LossConfig:
    """A validated loss config: its entries and where it came from.

    Attributes:
        entries: the validated entries, in config order.
        source: the YAML file it was read from, if any.
        raw: the config as given (parsed YAML, or the mapping or sequence passed in).
        lines: YAML line of each key path, where known.
    """

    entries: list[LossEntry]
    source: str | None = None
    raw: Any = field(default=None, repr=False)
    lines: dict[PathKey, int] = field(default_factory=dict, repr=False)


def _fmt_path(path: PathKey, prefix: str = "") -> str:
    text = prefix
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


class _Reader:
    """Build Python data from a YAML node tree, remembering lines and flagging duplicate keys."""

    def __init__(self, problems: list[Problem], source: str | None) -> None:
        self.problems = problems
        self.source = source
        self.lines: dict[PathKey, int] = {}
        self.key_lines: dict[PathKey, int] = {}
        self.constructor = yaml.SafeLoader("")
        self.visited = 0

    def problem(self, path: PathKey, line: int | None, message: str) -> None:
        self.problems.append(Problem(_fmt_path(path), message, self.source, line))

    def read(self, node: yaml.Node, path: PathKey, stack: tuple[int, ...] = ()) -> Any:
        self.visited += 1
        line = node.start_mark.line + 1
        self.lines.setdefault(path, line)
        if self.visited > _MAX_NODES:
            raise _TooLarge(line)
        if id(node) in stack:
            self.problem(path, line, "recursive YAML alias; a loss config must be a tree")
            return None
        stack = (*stack, id(node))
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and node.tag not in _PLAIN_TAGS:
            self.problem(
                path, line, f"YAML tag {node.tag!r} is not allowed (configs are read with a safe loader)"
            )
            return None
        if isinstance(node, yaml.MappingNode):
            result: dict[Any, Any] = {}
            try:
                self.constructor.flatten_mapping(node)
            except yaml.YAMLError as exc:
                self.problem(path, line, f"invalid YAML merge: {exc}")
                return None
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    self.problem(path, key_node.start_mark.line + 1, "mapping keys must be plain scalars")
                    continue
                key = self.scalar(key_node, path)
                if not isinstance(key, (str, int, float, bool)) and key is not None:
                    continue
                sub = (*path, key if isinstance(key, str) else str(key))
                self.key_lines.setdefault(sub, key_node.start_mark.line + 1)
                if key in result:
                    self.problem(
                        sub,
                        key_node.start_mark.line + 1,
                        f"duplicate key {key!r} (first at line {self.key_lines[sub]}); YAML would keep only the last",
                    )
                    continue
                result[key] = self.read(value_node, sub, stack)
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self.read(item, (*path, i), stack) for i, item in enumerate(node.value)]
        return self.scalar(node, path)

    def scalar(self, node: yaml.Node, path: PathKey) -> Any:
        try:
            return self.constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            tag = getattr(node, "tag", "?")
            self.problem(
                path,
                node.start_mark.line + 1,
                f"YAML tag {tag!r} is not allowed (configs are read with a safe loader): "
                f"{getattr(exc, 'problem', None) or exc}",
            )
            return None


class _TooLarge(Exception):
    def __init__(self, line: int) -> None:
        self.line = line


def _parse_yaml(
    text: str, source: str | None, problems: list[Problem]
) -> tuple[Any, dict[PathKey, int], dict[PathKey, int]]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        detail = " ".join(str(x) for x in (exc.context, exc.problem) if x)
        problems.append(Problem("", f"YAML syntax error: {detail}", source or "<string>", line))
        return None, {}, {}
    except yaml.YAMLError as exc:
        problems.append(Problem("", f"YAML error: {exc}", source or "<string>"))
        return None, {}, {}
    if node is None:
        problems.append(Problem("", "the config is empty; expected a 'losses' list", source or "<string>", 1))
        return None, {}, {}
    reader = _Reader(problems, source)
    try:
        data = reader.read(node, ())
    except _TooLarge as exc:
        problems.append(
            Problem("", f"the config has more than {_MAX_NODES} YAML nodes (alias bomb?)", source, exc.line)
        )
        return None, {}, {}
    return data, reader.lines, reader.key_lines


def _looks_like_path(text: str) -> bool:
    return "\n" not in text and (text.endswith((".yaml", ".yml")) or os.path.isfile(text))


def _given(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if value is None:
        return "null"
    kind = type(value).__name__
    article = "an" if kind[0] in "aeiou" else "a"
    return f"{value!r} ({article} {kind})"


def load_config(
    source: Any,
    *,
    registry: Registry | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> LossConfig:
    """Load and validate a loss config.

    Args:
        source: a YAML file path (``str`` or ``os.PathLike``), a YAML string, any mapping or sequence
            (``dict``, ``list``, OmegaConf ``DictConfig``/``ListConfig`` with interpolations resolved, a
            Hydra config), or a :class:`LossConfig` (re-validated).
        registry: where criteria are looked up (default: the process-wide registry).
        overrides: field values applied to every entry whose criterion declares that field, over the
            config's values; a key that no criterion declares is an error.

    Raises:
        ConfigError: listing every problem, each with its location: file and line for YAML, the key
            path from the config's root for mappings (OmegaConf keeps no line numbers).
    """
    registry = registry if registry is not None else get_registry()
    data, src_name, lines, key_lines = _source_data(source)
    report = _Reporter(src_name, lines, key_lines, root_path(data))
    reader = ContainerReader(report.unreadable, _MAX_NODES)
    try:
        plain = reader.top(data)
    except TooLarge:
        raise ConfigError([Problem(TOP, f"the config has more than {_MAX_NODES} nodes")]) from None
    fields = _plain_overrides(overrides, report)
    entries_path, entries = _locate_losses(plain, report)
    result: list[LossEntry] = []
    if entries is not None:
        result = _validate_entries(entries, entries_path, registry, fields, report)
    if report.problems:
        raise ConfigError(report.problems)
    return LossConfig(result, src_name, data, {**lines, **key_lines})


def _source_data(source: Any) -> tuple[Any, str | None, dict[PathKey, int], dict[PathKey, int]]:
    """``(data, source name, value lines, key lines)`` of any accepted source; YAML is parsed here."""
    if isinstance(source, LossConfig):
        return source.raw, source.source, dict(source.lines), dict(source.lines)
    if isinstance(source, Mapping) or is_sequence(source):
        return source, None, {}, {}
    name: str | None = None
    if isinstance(source, os.PathLike) or (isinstance(source, str) and _looks_like_path(source)):
        name = str(source)
        try:
            text = Path(source).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError([Problem("", f"config file not found: {name!r}")]) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError([Problem("", f"cannot read config file {name!r}: {exc}")]) from None
    elif isinstance(source, (str, bytes)):
        text = source if isinstance(source, str) else source.decode("utf-8", "replace")
    else:
        raise ConfigError(
            [
                Problem(
                    TOP,
                    "expected a YAML path or string, a mapping or a sequence (e.g. an OmegaConf "
                    f"DictConfig or ListConfig), got {type(source).__name__}",
                )
            ]
        )
    problems: list[Problem] = []
    data, lines, key_lines = _parse_yaml(text, name, problems)
    if problems:
        raise ConfigError(problems)
    return data, name, lines, key_lines


def _plain_overrides(overrides: Any, report: _Reporter) -> dict[str, Any]:
    """``overrides`` as a plain dict (OmegaConf values resolved); reports anything else."""
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        report.outside(f"expected a mapping of field values, got {_given(overrides)}")
        return {}
    reader = ContainerReader(lambda path, why: report.outside(f"{_fmt_path(path)}: {why}"), _MAX_NODES)
    plain = reader.read(overrides, ())
    return {k: v for k, v in plain.items() if v is not UNRESOLVED}


class _Reporter:
    """Collects problems located by key path (prefixed with where an OmegaConf node sits in its root)
    and, for YAML, by file and line. A problem under a node that could not be read is dropped: that
    node's own problem says what is wrong."""

    def __init__(
        self, source: str | None, lines: dict[PathKey, int], key_lines: dict[PathKey, int], prefix: str
    ) -> None:
        self.source = source
        self.lines = lines
        self.key_lines = key_lines
        self.prefix = prefix
        self.problems: list[Problem] = []
        self._unresolved: list[str] = []

    def text(self, path: PathKey) -> str:
        """``model.losses[0].gamma``: the key path as the user's config spells it."""
        return _fmt_path(path, self.prefix)

    def __call__(
        self,
        path: PathKey,
        message: str,
        *,
        criterion: str | None = None,
        line_of: PathKey | None = None,
    ) -> None:
        text = self.text(path)
        if any(text == u or text.startswith((f"{u}.", f"{u}[")) for u in self._unresolved):
            return
        line = self.key_lines.get(line_of) if line_of is not None else None
        line = line or self.key_lines.get(path) or self.lines.get(path)
        probe = path
        while line is None and probe:
            probe = probe[:-1]
            line = self.lines.get(probe)
        self.problems.append(Problem(text or TOP, message, self.source, line, criterion))

    def unreadable(self, path: PathKey, message: str) -> None:
        """A node that could not be read: report it, and nothing else under it."""
        self(path, message)
        self._unresolved.append(self.text(path))

    def outside(self, message: str) -> None:
        """A problem with ``overrides``, which is not part of the config."""
        self.problems.append(Problem("overrides", message))


def _locate_losses(data: Any, report: _Reporter) -> tuple[PathKey, Any]:
    if isinstance(data, (list, tuple)):
        path: PathKey = ()
        losses = data
    elif isinstance(data, Mapping):
        if "model" in data and isinstance(data["model"], Mapping) and "losses" in data["model"]:
            if "losses" in data:
                report(("losses",), "both 'losses' and 'model.losses' are given; keep one")
                return (), None
            path, losses = ("model", "losses"), data["model"]["losses"]
        elif "losses" in data:
            path, losses = ("losses",), data["losses"]
        elif "model" in data:
            if not isinstance(data["model"], Mapping):
                report(("model",), f"expected a mapping with a 'losses' list, got {_given(data['model'])}")
            else:
                keys = ", ".join(repr(k) for k in data["model"]) or "none"
                report(("model",), f"missing 'losses' (a list of loss entries); model has keys {keys}")
            return (), None
        else:
            keys = ", ".join(repr(k) for k in data) or "none"
            report(
                (), f"no loss list found: expected 'model.losses', 'losses' or a bare list; got keys {keys}"
            )
            return (), None
    else:
        report((), f"expected a mapping with 'losses' or a list of loss entries, got {_given(data)}")
        return (), None
    if not isinstance(losses, (list, tuple)):
        report(path, f"expected a list of loss entries, got {_given(losses)}")
        return path, None
    if len(losses) == 0:
        report(path, "the list of losses is empty; add at least one entry with a 'criterion'")
        return path, None
    return path, losses


def _validate_entries(
    entries: Sequence[Any],
    base: PathKey,
    registry: Registry,
    overrides: Mapping[str, Any],
    report: _Reporter,
) -> list[LossEntry]:
    result: list[LossEntry] = []
    names: dict[str, int] = {}
    declared: dict[str, Sequence[str]] = {}
    for i, entry in enumerate(entries):
        path: PathKey = (*base, i)
        if not isinstance(entry, Mapping):
            report(path, f"expected a mapping with a 'criterion' key, got {_given(entry)}")
            continue
        info = _check_criterion(entry, path, registry, report)
        weight = _check_weight(entry, path, report)
        name = _check_name(entry, path, names, report)
        if info is None:
            continue
        declared[info.name] = field_names(info.cls.Config)
        config = _check_fields(entry, path, info, overrides, report)
        if config is None or weight is None or name is None:
            continue
        result.append(LossEntry(name, info.name, weight, config, info, report.text(path)))
    _check_overrides(overrides, declared, report)
    return result


def _check_criterion(
    entry: Mapping[str, Any], path: PathKey, registry: Registry, report: _Reporter
) -> CriterionInfo | None:
    """The registered criterion an entry names, or ``None`` after reporting why not."""
    if "criterion" not in entry:
        report(path, f"missing 'criterion'; installed criteria: {', '.join(registry.names()) or 'none'}")
        return None
    criterion = entry["criterion"]
    if not isinstance(criterion, str):
        report((*path, "criterion"), f"expected a criterion name (a string), got {_given(criterion)}")
        return None
    try:
        return registry.get(criterion)
    except (CriterionConflictError, LookupError) as exc:
        report((*path, "criterion"), str(exc))
        return None


def _check_weight(entry: Mapping[str, Any], path: PathKey, report: _Reporter) -> float | None:
    """The entry's weight (absent or null: 1.0), or ``None`` after reporting a bad one."""
    weight = entry.get("weight")
    if weight is None:
        return 1.0
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        report((*path, "weight"), f"expected a float >= 0 (or null for 1.0), got {_given(weight)}")
    elif not math.isfinite(weight):
        report((*path, "weight"), f"expected a finite float >= 0, got {weight!r}")
    elif weight < 0:
        report((*path, "weight"), f"expected a float >= 0, got {weight!r}")
    else:
        return float(weight)
    return None


def _check_name(
    entry: Mapping[str, Any], path: PathKey, names: dict[str, int], report: _Reporter
) -> str | None:
    """The entry's unique name (default: its criterion), or ``None`` after reporting a problem.

    ``names`` maps the names seen so far to their entry index; a new unique name is added.
    """
    criterion = entry.get("criterion")
    name = entry.get("name", criterion if isinstance(criterion, str) else None)
    if "name" in entry and (not isinstance(name, str) or not _NAME_RE.match(name)):
        report(
            (*path, "name"),
            f"expected a name of letters, digits, '_' or '-' starting with a letter or '_', got {_given(name)}",
        )
        return None
    if not isinstance(name, str):
        return None
    if name in names:
        report(
            (*path, "name") if "name" in entry else (*path, "criterion"),
            f"duplicate loss name {name!r} (also at {report.text((*path[:-1], names[name]))}); "
            "give one of them a distinct 'name'",
        )
        return None
    names[name] = int(path[-1])
    return name


def _check_fields(
    entry: Mapping[str, Any],
    path: PathKey,
    info: CriterionInfo,
    overrides: Mapping[str, Any],
    report: _Reporter,
) -> Any:
    """The criterion's validated ``Config`` (overrides applied), or ``None`` after reporting problems."""
    declared = field_names(info.cls.Config)
    # a value holding a node that could not be read is left out: that node's problem is reported
    fields = {k: v for k, v in entry.items() if k not in RESERVED and not _holds_unresolved(v)}
    fields.update({k: v for k, v in overrides.items() if k in declared})

    def field_report(fname: str, message: str) -> None:
        if message.startswith("unknown field"):
            report(path, message, criterion=info.name, line_of=(*path, fname))
        else:
            report((*path, fname) if fname else path, message, criterion=info.name)

    return validate_config(info.cls.Config, fields, report=field_report)


def _holds_unresolved(value: Any) -> bool:
    if value is UNRESOLVED:
        return True
    if isinstance(value, Mapping):
        return any(_holds_unresolved(v) for v in value.values())
    return isinstance(value, list) and any(_holds_unresolved(v) for v in value)


def _check_overrides(
    overrides: Mapping[str, Any], declared: Mapping[str, Sequence[str]], report: _Reporter
) -> None:
    """Report each override that no criterion of the config declares."""
    for key in overrides:
        if any(key in fields for fields in declared.values()):
            continue
        listing = "; ".join(f"{c}: {', '.join(f) or '(none)'}" for c, f in declared.items()) or "none"
        message = f"{key!r} is not a field of any criterion in the config ({listing})"
        hint = _epoch_hint(key)
        report.outside(f"{message}; {hint}" if hint else message)


_EPOCH_RE = re.compile(r"^(cur|curr|current|start|init|initial)?_?epoch(_?(idx|index|num|number))?$", re.I)


def _epoch_hint(key: object) -> str | None:
    if isinstance(key, str) and _EPOCH_RE.match(key):
        return (
            "losskit does not take the epoch at build time: call `loss.set_epoch(epoch)` each epoch "
            "(or `build_losses(..., epoch=N)` for the first one)"
        )
    return None


def unexpected_keyword_message(key: str) -> str:
    """What ``build_losses(..., key=...)`` should have been, for a keyword it does not take."""
    message = f"build_losses() got an unexpected keyword argument {key!r}"
    hint = _epoch_hint(key)
    if hint:
        return f"{message}: {hint}"
    return (
        f"{message}; it takes registry, device, epoch and overrides: to set a field of every criterion "
        f"that declares it, pass overrides={{{key!r}: ...}}"
    )
