# SPDX-License-Identifier: Apache-2.0
"""Read a config given as any mapping or sequence (plain, OmegaConf, Hydra) into dicts and lists.

OmegaConf is not a dependency of losskit and is never imported here: a ``DictConfig`` or ``ListConfig``
only exists once the caller has imported ``omegaconf``, so its module is looked up in ``sys.modules``.
Reading a node resolves its interpolations; a node that cannot be resolved (a missing interpolation
key, a mandatory ``???`` value, a failing resolver) is reported with its key path and read as
:data:`UNRESOLVED`, so one bad node does not hide the others.

Only what the loss config needs is read: at the top of a mapping, ``losses`` and ``model.losses``;
the trainer's other sections (data, optimizer, ...) are never resolved.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["UNRESOLVED", "ContainerReader", "TooLarge", "is_sequence", "root_path"]

PathKey = tuple[str | int, ...]


class _Marker:
    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


#: A node that could not be read (already reported).
UNRESOLVED = _Marker("<unresolved>")
#: A top-level value the loss config does not need (never read).
NOT_READ = _Marker("<not read>")


class TooLarge(Exception):
    """The config has more nodes than the reader accepts."""


def is_sequence(value: object) -> bool:
    """A sequence that is a list of values (not text)."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray))


def _omegaconf() -> Any:
    return sys.modules.get("omegaconf")


def _omegaconf_errors() -> tuple[type[BaseException], ...]:
    base = getattr(getattr(_omegaconf(), "errors", None), "OmegaConfBaseException", None)
    return (base,) if isinstance(base, type) and issubclass(base, BaseException) else ()


def is_omegaconf(value: object) -> bool:
    """Whether ``value`` is an OmegaConf container (without importing OmegaConf)."""
    om = _omegaconf()
    return om is not None and bool(om.OmegaConf.is_config(value))


def root_path(value: object) -> str:
    """Where an OmegaConf node sits in its root config (``"model"``, ``"model.losses"``); ``""`` for a
    root or anything else, so that errors name the key path of the user's whole config."""
    if not is_omegaconf(value):
        return ""
    parts: list[str] = []
    node: Any = value
    try:
        while (parent := node._get_parent()) is not None:
            key = node._key()
            parts.append(f"[{key}]" if is_sequence(parent) else f".{key}")
            node = parent
    except Exception:  # a private OmegaConf API changed: fall back to paths relative to the node
        return ""
    return "".join(reversed(parts)).lstrip(".")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _raw_text(node: Any, key: Any) -> Any:
    """The unresolved value at ``node[key]`` (e.g. ``'${loss_weight}'``), or None."""
    try:
        return _omegaconf().OmegaConf.to_container(node, resolve=False)[key]
    except Exception:
        return None


def _why_unreadable(node: Any, key: Any, exc: BaseException) -> str:
    errors = getattr(_omegaconf(), "errors", None)
    missing = getattr(errors, "MissingMandatoryValue", None)
    if isinstance(missing, type) and isinstance(exc, missing):
        return "mandatory value '???' is not set"
    raw = _raw_text(node, key)
    if isinstance(raw, str) and "${" in raw:
        return f"cannot resolve {raw!r}: {_first_line(exc)}"
    return f"cannot read this OmegaConf node: {_first_line(exc)}"


class ContainerReader:
    """Reads mappings and sequences into dicts and lists, reporting nodes that cannot be read.

    Args:
        unreadable: called with the key path of each node that cannot be read and why.
        max_nodes: the most nodes read (guards against huge or self-referencing inputs).
    """

    def __init__(self, unreadable: Callable[[PathKey, str], None], max_nodes: int) -> None:
        self.unreadable = unreadable
        self.max_nodes = max_nodes
        self.visited = 0
        self.errors = _omegaconf_errors()

    def top(self, data: Any) -> Any:
        """The parts of a config that locate its losses: a list in full; of a mapping, ``losses`` and
        ``model.losses`` in full, ``model`` and the other keys as keys only."""
        if not isinstance(data, Mapping):
            return self.read(data, ())
        top: dict[Any, Any] = dict.fromkeys(data, NOT_READ)
        if "losses" in top:
            top["losses"] = self.read(self.get(data, "losses", ("losses",)), ("losses",))
        if "model" in top:
            model = self.get(data, "model", ("model",))
            if isinstance(model, Mapping):
                inner: dict[Any, Any] = dict.fromkeys(model, NOT_READ)
                if "losses" in inner:
                    path: PathKey = ("model", "losses")
                    inner["losses"] = self.read(self.get(model, "losses", path), path)
                top["model"] = inner
            else:
                top["model"] = self.read(model, ("model",))
        return top

    def get(self, node: Any, key: Any, path: PathKey) -> Any:
        """``node[key]`` with interpolations resolved, or :data:`UNRESOLVED` after reporting why not."""
        try:
            return node[key]
        except self.errors as exc:
            self.unreadable(path, _why_unreadable(node, key, exc))
            return UNRESOLVED

    def read(self, node: Any, path: PathKey, stack: tuple[int, ...] = ()) -> Any:
        """``node`` as plain data: mappings as dicts, sequences (not text) as lists, the rest as is."""
        self.visited += 1
        if self.visited > self.max_nodes:
            raise TooLarge
        is_map = isinstance(node, Mapping)
        if not is_map and not is_sequence(node):
            return node
        if id(node) in stack:
            self.unreadable(path, "the config refers to itself here; a loss config must be a tree")
            return UNRESOLVED
        stack = (*stack, id(node))
        if is_map:
            result: dict[Any, Any] = {}
            for key in list(node):
                sub = (*path, key if isinstance(key, str) else str(key))
                result[key] = self.read(self.get(node, key, sub), sub, stack)
            return result
        return [self.read(self.get(node, i, (*path, i)), (*path, i), stack) for i in range(len(node))]
