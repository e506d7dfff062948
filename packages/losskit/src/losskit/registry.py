# SPDX-License-Identifier: Apache-2.0
"""Criterion registry: pluggy over the ``losskit`` entry-point group.

Discovery is lazy (importing ``losskit`` scans nothing) and cached per process. Each plugin's
``register_criteria`` hook is called on its own, so every criterion is attributed to the plugin and
distribution that registered it, and a plugin that fails is reported without breaking the others.

Set ``LOSSKIT_DISABLE_PLUGIN_AUTOLOAD=1`` to skip entry points; ``LOSSKIT_PLUGINS=mod_a,mod_b`` then
loads the named plugin modules explicitly.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import threading
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pluggy

from losskit import hookspecs
from losskit.criterion import Criterion
from losskit.errors import CriterionConflictError, PluginError, UnknownCriterionError
from losskit.schema import suggest

__all__ = [
    "FIRST_PARTY",
    "CriterionInfo",
    "PluginFailure",
    "Registry",
    "get_plugin_manager",
    "get_registry",
    "register_criterion",
]

ENTRY_POINT_GROUP = "losskit"
DISABLE_AUTOLOAD_ENV = "LOSSKIT_DISABLE_PLUGIN_AUTOLOAD"
PLUGINS_ENV = "LOSSKIT_PLUGINS"

#: First-party criteria and the distribution to install for each.
FIRST_PARTY: dict[str, str] = {
    "cross_entropy": "losskit-classification",
    "focal_loss": "losskit-classification",
    "yolox_loss": "losskit-detection-yolox",
    "yolofastest_loss": "losskit-detection-yolox",
    "retinanet_loss": "losskit-detection-retinanet",
    "pidnet_loss": "losskit-segmentation-pidnet",
    "detr_loss": "losskit-detection-detr",
    "rtmcc_loss": "losskit-pose-rtmcc",
    "yolov9_loss": "losskit-detection-yolov9",
    "seg_cross_entropy": "losskit-segmentation",
}


@dataclass(frozen=True)
class CriterionInfo:
    """A registered criterion and who provided it."""

    name: str
    cls: type[Criterion]
    plugin: str
    distribution: str | None = None
    version: str | None = None

    @property
    def provider(self) -> str:
        """``distribution version`` or the plugin name when it is not from a distribution."""
        if self.distribution:
            return f"{self.distribution} {self.version}" if self.version else self.distribution
        return f"plugin {self.plugin!r}"

    @property
    def summary(self) -> str:
        """The first line of the criterion class's docstring."""
        doc = (self.cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be loaded or whose hook failed."""

    plugin: str
    distribution: str | None
    version: str | None
    error: str
    detail: str = field(default="", repr=False)

    def __str__(self) -> str:
        dist = f" ({self.distribution} {self.version})" if self.distribution else ""
        return f"plugin {self.plugin!r}{dist} failed to load: {self.error}"


def get_plugin_manager() -> pluggy.PluginManager:
    """A fresh plugin manager with losskit's hook specification (nothing registered)."""
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    return pm


def _autoload_disabled() -> bool:
    return os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


class Registry:
    """Criteria by name, discovered from plugins on first use.

    Args:
        plugin_manager: inject a manager (tests, applications); by default a fresh one.
        autoload: scan the ``losskit`` entry-point group; ``None`` reads ``LOSSKIT_DISABLE_PLUGIN_AUTOLOAD``.
        entry_points: the entry points to load instead of the installed ones (tests).
    """

    def __init__(
        self,
        plugin_manager: pluggy.PluginManager | None = None,
        *,
        autoload: bool | None = None,
        entry_points: Iterable[md.EntryPoint] | None = None,
    ) -> None:
        self.pm = plugin_manager if plugin_manager is not None else get_plugin_manager()
        self._autoload = autoload
        self._entry_points = list(entry_points) if entry_points is not None else None
        self._criteria: dict[str, CriterionInfo] = {}
        self._conflicts: dict[str, list[CriterionInfo]] = {}
        self._failures: list[PluginFailure] = []
        self._dists: dict[str, tuple[str | None, str | None]] = {}
        self._called: set[str] = set()
        self._loaded = False
        self._lock = threading.RLock()

    # -- discovery -----------------------------------------------------------------------------

    def _load(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            autoload = self._autoload if self._autoload is not None else not _autoload_disabled()
            if autoload:
                eps = self._entry_points
                if eps is None:
                    eps = list(md.entry_points(group=ENTRY_POINT_GROUP))
                for ep in sorted(eps, key=lambda e: e.name):
                    self._load_entry_point(ep)
            for modname in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
                self._load_module_by_name(modname)
            self._check_pending()
            self._call_hooks()
            self._loaded = True

    def _load_entry_point(self, ep: md.EntryPoint) -> None:
        dist = getattr(ep, "dist", None)
        dist_name = dist.metadata["Name"] if dist is not None else None
        version = dist.version if dist is not None else None
        if self.pm.has_plugin(ep.name) or ep.name in self._dists:
            other = self._dists.get(ep.name, (None, None))[0]
            self._failures.append(
                PluginFailure(
                    ep.name,
                    dist_name,
                    version,
                    f"entry-point name {ep.name!r} is already used by {other or 'another plugin'}; "
                    "plugin names must be unique",
                )
            )
            return
        try:
            module = ep.load()
        except Exception as exc:  # a broken plugin must not break the others
            self._failures.append(
                PluginFailure(ep.name, dist_name, version, _error_text(exc), traceback.format_exc())
            )
            return
        self._register_module(module, ep.name, dist_name, version)

    def _load_module_by_name(self, modname: str) -> None:
        if self.pm.has_plugin(modname):
            return
        try:
            module = importlib.import_module(modname)
        except Exception as exc:
            self._failures.append(
                PluginFailure(modname, None, None, _error_text(exc), traceback.format_exc())
            )
            return
        self._register_module(module, modname, None, None)

    def _register_module(self, plugin: object, name: str, dist: str | None, version: str | None) -> None:
        try:
            self.pm.register(plugin, name=name)
        except Exception as exc:
            self._failures.append(
                PluginFailure(name, dist, version, _error_text(exc), traceback.format_exc())
            )
            return
        self._dists[name] = (dist, version)

    def _check_pending(self) -> None:
        # A misspelled hook name would otherwise be silently ignored.
        while True:
            try:
                self.pm.check_pending()
                return
            except pluggy.PluginValidationError as exc:
                name = self.pm.get_name(exc.plugin) or repr(exc.plugin)
                dist, version = self._dists.pop(name, (None, None))
                self.pm.unregister(exc.plugin)
                self._failures.append(PluginFailure(name, dist, version, _error_text(exc)))

    def _call_hooks(self) -> None:
        for impl in self.pm.hook.register_criteria.get_hookimpls():
            if impl.plugin_name in self._called:
                continue
            self._called.add(impl.plugin_name)
            dist, version = self._dists.get(impl.plugin_name, (None, None))
            added: list[str] = []

            def register(
                criterion: type[Criterion],
                *,
                name: str | None = None,
                _plugin: str = impl.plugin_name,
                _dist: str | None = dist,
                _version: str | None = version,
                _added: list[str] = added,
            ) -> None:
                info = self._make_info(criterion, name, _plugin, _dist, _version)
                self._add(info)
                _added.append(info.name)

            try:
                kwargs: dict[str, Any] = {"register": register}
                impl.function(*[kwargs[a] for a in impl.argnames])
            except Exception as exc:
                for n in added:  # drop half-registered criteria of the failed plugin
                    if self._criteria.get(n) and self._criteria[n].plugin == impl.plugin_name:
                        del self._criteria[n]
                self._failures.append(
                    PluginFailure(impl.plugin_name, dist, version, _error_text(exc), traceback.format_exc())
                )

    @staticmethod
    def _make_info(
        criterion: Any, name: str | None, plugin: str, dist: str | None, version: str | None
    ) -> CriterionInfo:
        if not (isinstance(criterion, type) and issubclass(criterion, Criterion)):
            raise PluginError(
                f"plugin {plugin!r}: register() expects a losskit.Criterion subclass, got {criterion!r}"
            )
        name = name or criterion.name
        if not isinstance(name, str) or not name.isidentifier():
            raise PluginError(
                f"plugin {plugin!r}: criterion name {name!r} of {criterion.__qualname__} is not a valid "
                "identifier (letters, digits, underscores)"
            )
        return CriterionInfo(name, criterion, plugin, dist, version)

    def _add(self, info: CriterionInfo, *, replace: bool = False) -> None:
        if info.name in self._conflicts:
            self._conflicts[info.name].append(info)
            return
        existing = self._criteria.get(info.name)
        if existing is not None and not replace:
            del self._criteria[info.name]
            self._conflicts[info.name] = [existing, info]
            return
        self._criteria[info.name] = info

    # -- public API ----------------------------------------------------------------------------

    def register(self, criterion: type[Criterion], *, name: str | None = None, replace: bool = False) -> None:
        """Register a criterion class from code (a notebook's custom loss, tests).

        A name that is already registered raises :class:`CriterionConflictError` unless ``replace``.
        """
        self._load()
        info = self._make_info(criterion, name, "<code>", None, None)
        with self._lock:
            if not replace and (info.name in self._criteria or info.name in self._conflicts):
                existing = self._criteria.get(info.name) or self._conflicts[info.name][0]
                raise CriterionConflictError(
                    f"criterion {info.name!r} is already registered by {existing.provider}; "
                    "pass replace=True to replace it"
                )
            self._conflicts.pop(info.name, None)
            self._add(info, replace=True)

    def add_plugin(self, plugin: object, name: str | None = None) -> None:
        """Register a plugin object or module implementing ``register_criteria`` (no distribution)."""
        self._load()
        name = name or getattr(plugin, "__name__", None) or repr(plugin)
        with self._lock:
            self._register_module(plugin, name, None, None)
            self._check_pending()
            self._call_hooks()

    def get(self, name: str) -> CriterionInfo:
        """The criterion registered as ``name``; raises :class:`UnknownCriterionError` or
        :class:`CriterionConflictError` with the details."""
        self._load()
        if name in self._conflicts:
            providers = " and ".join(i.provider for i in self._conflicts[name])
            raise CriterionConflictError(
                f"criterion {name!r} is registered by both {providers}; uninstall one of them"
            )
        info = self._criteria.get(name)
        if info is None:
            raise UnknownCriterionError(
                self.unknown_message(name), name=name, suggestions=self._suggest(name)
            )
        return info

    def _suggest(self, name: str) -> list[str]:
        close = suggest(name, [*self._criteria, *FIRST_PARTY])
        return [close] if close else []

    def unknown_message(self, name: Any) -> str:
        """Why ``name`` is not available: suggestion, installed names, package to install, failures."""
        self._load()
        parts = [f"unknown criterion {name!r}"]
        if isinstance(name, str):
            if name in FIRST_PARTY:
                dist = FIRST_PARTY[name]
                parts = [f"criterion {name!r} is not installed; it is provided by {dist}: pip install {dist}"]
            else:
                close = self._suggest(name)
                if close:
                    extra = ""
                    if close[0] not in self._criteria and close[0] in FIRST_PARTY:
                        extra = f" (from {FIRST_PARTY[close[0]]}, not installed)"
                    parts.append(f"did you mean {close[0]!r}{extra}?")
        installed = ", ".join(sorted(self._criteria)) or "none"
        parts.append(f"installed criteria: {installed}")
        text = "; ".join(parts)
        if self._failures:
            text += "; note: " + "; ".join(str(f) for f in self._failures)
        return text

    def names(self) -> list[str]:
        """Sorted names of the usable criteria."""
        self._load()
        return sorted(self._criteria)

    def __iter__(self) -> Iterator[CriterionInfo]:
        self._load()
        return iter([self._criteria[n] for n in sorted(self._criteria)])

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._criteria

    @property
    def failures(self) -> list[PluginFailure]:
        """Plugins that failed to load or register."""
        self._load()
        return list(self._failures)

    @property
    def conflicts(self) -> dict[str, list[CriterionInfo]]:
        """Criterion names registered by more than one provider (unusable until resolved)."""
        self._load()
        return {k: list(v) for k, v in self._conflicts.items()}


_default: Registry | None = None
_default_lock = threading.Lock()


def get_registry() -> Registry:
    """The process-wide registry (created on first use; discovery runs on its first lookup)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Registry()
        return _default


def register_criterion(
    criterion: type[Criterion] | None = None,
    *,
    name: str | None = None,
    replace: bool = False,
    registry: Registry | None = None,
) -> Any:
    """Register a criterion class without a package; usable as a decorator.

    Example::

        @losskit.register_criterion
        class MyLoss(losskit.Criterion):
            name = "my_loss"
            ...
    """

    def apply(cls: type[Criterion]) -> type[Criterion]:
        (registry or get_registry()).register(cls, name=name, replace=replace)
        return cls

    return apply if criterion is None else apply(criterion)
