# SPDX-License-Identifier: Apache-2.0
"""Typed config schemas for criteria.

A criterion declares its fields as a dataclass whose fields are made with :func:`option`::

    @dataclass(frozen=True)
    class Config:
        gamma: float = option(2.0, ge=0.0, doc="Focusing parameter.")
        reduction: Literal["mean", "sum"] = option("mean", doc="How elements are reduced.")

Keys a config must not hold although users write them (a deprecated option of the reference, say)
go in a ``rejected_fields: ClassVar[dict[str, str]]`` of the dataclass, each with the message that
says what to do instead (``{key}`` and ``{value}`` are filled in); they are not fields.

The schema drives validation (of YAML configs and of keyword arguments alike), ``losskit describe``
and the generated reference docs. Supported annotations: ``bool``, ``int``, ``float``, ``str``,
``Literal[...]``, ``X | None``, ``tuple[X, ...]``, ``tuple[X, Y]`` and ``list[X]`` of scalars, and
another config dataclass: a *nested* field, given in YAML as a mapping with fixed keys::

    @dataclass(frozen=True)
    class Costs:
        cost_class: float = option(2.0, ge=0.0, doc="Weight of the class cost.")

    @dataclass(frozen=True)
    class Config:
        weight_dict: Costs = option(Costs(), doc="Weights of the matching costs.")

A nested mapping is validated recursively: its problems are reported with dotted paths
(``weight_dict.cost_clas``, with a suggestion for an unknown key), and keys it leaves out take the
field's default.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

__all__ = [
    "FieldInfo",
    "describe_fields",
    "is_nested",
    "option",
    "required_examples",
    "suggest",
    "validate_config",
]

_META_KEY = "losskit"


@dataclass(frozen=True)
class _Constraint:
    doc: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    min_items: int | None = None
    max_items: int | None = None
    negative_disables: bool = False  # e.g. focal alpha: a negative value switches the term off
    required: bool = False  # no usable default: the config must give it (the default is None)
    example: Any = None  # a valid value of a required field, for messages and generated docs


def option(
    default: Any,
    *,
    doc: str,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    min_items: int | None = None,
    max_items: int | None = None,
    negative_disables: bool = False,
    required: bool = False,
    example: Any = None,
) -> Any:
    """Declare a config field with its default, documentation and allowed range.

    Args:
        default: the default value (lists are stored as tuples so defaults stay immutable).
        doc: one-line description, shown by ``losskit describe`` and in the reference docs.
        ge, gt, le, lt: bounds for numbers, applied to each item of a sequence.
        min_items, max_items: length bounds for sequences.
        negative_disables: any negative number is also allowed (it disables the feature).
        required: the field has no usable default: a config without it (or with null) is rejected,
            naming the field and showing ``example``. Its ``default`` must be None.
        example: a valid value of a required field, shown in the error and in the generated docs.
    """
    if isinstance(default, list):
        default = tuple(default)
    if required and (default is not None or example is None):
        raise TypeError("option(required=True) takes default None and an example value")
    meta = _Constraint(doc, ge, gt, le, lt, min_items, max_items, negative_disables, required, example)
    return dataclasses.field(default=default, metadata={_META_KEY: meta})


@dataclass(frozen=True)
class FieldInfo:
    """A field as shown to users."""

    name: str
    type: str
    default: Any
    allowed: str
    doc: str
    nested: bool = False  # a mapping whose keys follow as rows named ``name.key``
    required: bool = False  # no default: the config must give it; ``example`` shows a valid value
    example: Any = None


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _constraint(f: dataclasses.Field[Any]) -> _Constraint:
    meta = f.metadata.get(_META_KEY)
    return meta if isinstance(meta, _Constraint) else _Constraint(doc="")


def is_nested(tp: Any) -> bool:
    """Whether an annotation is a nested config (a dataclass), given in YAML as a mapping."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _flow(value: Any) -> str:
    """A value in YAML flow style (``[[12, 18], [115, 73]]``)."""
    return repr(_plain(value)).replace("'", "")


def _plain(value: Any) -> Any:
    """A default as plain data: nested configs as dicts (in field order), tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return f"list[{_type_name(args[0])}]"
        if origin is tuple:
            return f"list[{', '.join(_type_name(a) for a in args)}]"
        return f"list[{_type_name(args[0])}]"
    return getattr(tp, "__name__", str(tp))


def _fmt_num(x: float) -> str:
    return repr(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


def _bounds_text(c: _Constraint) -> str:
    lo = f">= {_fmt_num(c.ge)}" if c.ge is not None else (f"> {_fmt_num(c.gt)}" if c.gt is not None else "")
    hi = f"<= {_fmt_num(c.le)}" if c.le is not None else (f"< {_fmt_num(c.lt)}" if c.lt is not None else "")
    if c.ge is not None and c.le is not None:
        text = f"[{_fmt_num(c.ge)}, {_fmt_num(c.le)}]"
    else:
        text = " and ".join(filter(None, (lo, hi)))
    if c.negative_disables:
        text = f"{text}, or < 0 to disable" if text else "< 0 disables"
    return text


def _count_text(c: _Constraint) -> str:
    def items(n: int) -> str:
        return f"{n} item{'s' if n != 1 else ''}"

    if c.min_items is not None and c.min_items == c.max_items:
        return f"exactly {items(c.min_items)}"
    parts = []
    if c.min_items is not None:
        parts.append(f"at least {items(c.min_items)}")
    if c.max_items is not None:
        parts.append(f"at most {items(c.max_items)}")
    return ", ".join(parts)


def _range_text(c: _Constraint, *, sequence: bool = False) -> str:
    """Allowed numbers (each item's, for sequences) and sequence lengths, in words."""
    bounds = _bounds_text(c)
    if sequence and bounds:
        bounds = f"each {bounds}"
    return ", ".join(filter(None, (bounds, _count_text(c) if sequence else "")))


def _allowed(tp: Any, c: _Constraint) -> str:
    """Allowed values in words: the range for numbers, the choices for enumerations."""
    if _is_union(tp):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = " or ".join(filter(None, (_allowed(a, c) for a in rest)))
        if not inner:
            return "null allowed"
        return f"{inner}; or null" if "," in inner else f"{inner} or null"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if tp is bool:
        return "true, false"
    return _range_text(c, sequence=typing.get_origin(tp) in (list, tuple))


def describe_fields(cls: type, *, prefix: str = "", defaults: Any = None) -> list[FieldInfo]:
    """The fields of a config dataclass: name, type, default, allowed values, doc.

    A nested field gives a row of type ``mapping`` (``nested=True``, its default as a dict), followed by
    one row per key, named ``field.key`` (recursively), whose defaults are those of the field's default.
    """
    hints = _hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        c = _constraint(f)
        value = getattr(defaults, f.name) if defaults is not None else f.default
        default = _plain(value) if value is not dataclasses.MISSING else None
        tp = hints[f.name]
        name = f"{prefix}{f.name}"
        if is_nested(tp):
            keys = ", ".join(g.name for g in dataclasses.fields(tp))
            out.append(FieldInfo(name, "mapping", default, f"keys {keys}", c.doc, nested=True))
            inner = value if isinstance(value, tp) else None
            out += describe_fields(tp, prefix=f"{name}.", defaults=inner)
            continue
        out.append(
            FieldInfo(
                name,
                _type_name(tp),
                default,
                _allowed(tp, c),
                c.doc,
                required=c.required,
                example=_plain(c.example),
            )
        )
    return out


def required_examples(cls: type) -> dict[str, Any]:
    """``{field: example}`` for the required fields of the config dataclass ``cls`` (often empty):
    merged into an entry, it makes the criterion buildable (``losskit run``, tests, docs)."""
    return {
        f.name: _plain(_constraint(f).example) for f in dataclasses.fields(cls) if _constraint(f).required
    }


def suggest(word: str, choices: Iterable[str]) -> str | None:
    """The closest of ``choices`` to ``word``, if any is close enough."""
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


class _Invalid(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _given(value: Any) -> str:
    kind = "null" if value is None else type(value).__name__
    if isinstance(value, str):
        return f"{value!r} (a string)"
    if isinstance(value, bool):
        return f"{value!r} (a bool)"
    if isinstance(value, (Mapping, list, tuple)):
        text = repr(value)
        text = text if len(text) <= 60 else text[:57] + "..."
        return f"{text} (a {'mapping' if isinstance(value, Mapping) else 'list'})"
    return f"{value!r}" if kind in ("int", "float", "null") else f"{value!r} (a {kind})"


def _string_hint(value: str, want: str) -> str:
    try:
        float(value)
    except ValueError:
        return ""
    if want not in ("float", "int"):
        return ""
    hint = "; write it as a number without quotes"
    if "e" in value.lower() and "." not in value:
        hint += " (YAML reads exponents like 1e-3 as strings: write 1.0e-3)"
    return hint


def _expect(tp: Any) -> str:
    """'a float', 'an int', ... for messages."""
    names = {bool: "a bool (true/false)", int: "an int", float: "a float", str: "a string"}
    if tp in names:
        return names[tp]
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return _type_name(tp)


def _check_range(x: float, c: _Constraint) -> None:
    if c.negative_disables and x < 0:
        return
    bad = (
        (c.ge is not None and not x >= c.ge)
        or (c.gt is not None and not x > c.gt)
        or (c.le is not None and not x <= c.le)
        or (c.lt is not None and not x < c.lt)
    )
    if bad:
        raise _Invalid(f"{_fmt_num(x)} is out of range; allowed: {_range_text(c)}")


def _coerce_scalar(value: Any, tp: Any, c: _Constraint) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Invalid(f"expected a bool (true/false), got {_given(value)}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer() and math.isfinite(value):
                value = int(value)
            else:
                hint = _string_hint(value, "int") if isinstance(value, str) else ""
                raise _Invalid(f"expected an int, got {_given(value)}{hint}")
        _check_range(value, c)
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = _string_hint(value, "float") if isinstance(value, str) else ""
            raise _Invalid(f"expected a float, got {_given(value)}{hint}")
        value = float(value)
        if not math.isfinite(value):
            raise _Invalid(f"expected a finite float, got {value!r}")
        _check_range(value, c)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise _Invalid(f"expected a string, got {_given(value)}")
        return value
    if typing.get_origin(tp) is Literal:
        allowed = typing.get_args(tp)
        if (
            isinstance(value, bool)
            or value not in allowed
            or type(value) is not type(next((a for a in allowed if a == value), value))
        ):
            close = suggest(value, [str(a) for a in allowed]) if isinstance(value, str) else None
            hint = f"; did you mean {close!r}?" if close else ""
            raise _Invalid(f"got {_given(value)}{hint}; allowed: {', '.join(repr(a) for a in allowed)}")
        return value
    raise TypeError(f"unsupported schema annotation {tp!r}")  # a bug in the criterion, not user input


def _coerce(value: Any, tp: Any, c: _Constraint) -> Any:
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        errors = []
        for a in rest:
            try:
                return _coerce(value, a, c)
            except _Invalid as e:
                errors.append(e.message)
        if len(rest) == 1:
            msg = errors[0]
            if msg.startswith("expected ") and ", got " in msg and not msg.startswith("expected a finite"):
                msg = f"expected {_type_name(tp)}, got " + msg.split(", got ", 1)[1]
            raise _Invalid(msg)
        raise _Invalid(f"expected {_type_name(tp)}, got {_given(value)}")
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
            raise _Invalid(f"expected {_type_name(tp)}, got {_given(value)}")
        args = typing.get_args(tp)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _Invalid(f"expected {len(args)} items, got {len(value)}")
            item_types = list(args)
        else:
            item_types = [args[0]] * len(value)
        if c.min_items is not None and len(value) < c.min_items:
            raise _Invalid(f"expected at least {c.min_items} item(s), got {len(value)}")
        if c.max_items is not None and len(value) > c.max_items:
            raise _Invalid(f"expected at most {c.max_items} items, got {len(value)}")
        items = []
        for i, (v, t) in enumerate(zip(value, item_types)):
            try:
                items.append(_coerce(v, t, c))
            except _Invalid as e:
                raise _Invalid(f"item [{i}]: {e.message}") from None
        return tuple(items)
    if isinstance(value, (list, tuple, Mapping)):
        raise _Invalid(f"expected {_expect(tp)}, got {_given(value)}")
    return _coerce_scalar(value, tp, c)


def validate_config(
    cls: type,
    values: Mapping[str, Any],
    *,
    report: Callable[[str, str], None],
) -> Any:
    """Validate ``values`` against the config dataclass ``cls``.

    Each problem is passed to ``report(field, message)``; ``field`` is the field name ('' for the
    whole entry). Returns the config instance, or None when any problem was reported.
    """
    return _validate(cls, values, report=report, default=None, word="field")


def _validate(
    cls: type,
    values: Mapping[str, Any],
    *,
    report: Callable[[str, str], None],
    default: Any,
    word: str,
) -> Any:
    """:func:`validate_config` of ``cls``, starting from ``default`` (an instance) when given."""
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    ok = True
    clean: dict[str, Any] = {}
    rejected: Mapping[str, str] = getattr(cls, "rejected_fields", {})
    for key, value in values.items():
        if isinstance(key, str) and key in rejected:
            report(key, rejected[key].format(key=key, value=value))
            ok = False
            continue
        if not isinstance(key, str) or key not in fields:
            close = suggest(key, fields) if isinstance(key, str) else None
            hint = f"; did you mean {close!r}?" if close else ""
            valid = ", ".join(fields) or "(none)"
            report(str(key), f"unknown {word} {key!r}{hint} (valid {word}s: {valid})")
            ok = False
            continue
        tp = hints[key]
        if is_nested(tp):
            nested = _validate_nested(tp, value, fields[key], key, report)
            if nested is None:
                ok = False
            else:
                clean[key] = nested
            continue
        try:
            clean[key] = _coerce(value, tp, _constraint(fields[key]))
        except _Invalid as e:
            report(key, e.message)
            ok = False
    if not ok:
        return None
    instance = dataclasses.replace(default, **clean) if default is not None else cls(**clean)
    for f in fields.values():
        c = _constraint(f)
        if c.required and getattr(instance, f.name) is None:
            report(
                f.name,
                f"required: {c.doc[:1].lower()}{c.doc[1:].rstrip('.')}; e.g. {f.name}: {_flow(c.example)}",
            )
            ok = False
    if not ok:
        return None
    check = getattr(instance, "validate", None)
    if callable(check):
        for field_name, message in check():
            report(field_name, message)
            ok = False
    return instance if ok else None


def _validate_nested(
    tp: type,
    value: Any,
    field: dataclasses.Field[Any],
    key: str,
    report: Callable[[str, str], None],
) -> Any:
    """A nested config from a mapping (or an instance of ``tp``); problems reported as ``key.sub``."""
    if isinstance(value, tp):
        value = _plain_mapping(value)
    if not isinstance(value, Mapping):
        keys = ", ".join(f.name for f in dataclasses.fields(tp))
        report(key, f"expected a mapping with keys {keys}, got {_given(value)}")
        return None

    def nested_report(sub: str, message: str) -> None:
        report(f"{key}.{sub}" if sub else key, message)

    default = field.default if isinstance(field.default, tp) else None
    return _validate(tp, value, report=nested_report, default=default, word="key")


def _plain_mapping(value: Any) -> dict[str, Any]:
    """The fields of a config instance as a mapping (nested configs stay instances)."""
    return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}


def field_names(cls: type) -> Sequence[str]:
    """Names of the fields of a config dataclass."""
    return [f.name for f in dataclasses.fields(cls)]
