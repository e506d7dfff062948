# SPDX-License-Identifier: Apache-2.0
"""Exception hierarchy of losskit.

Every error losskit raises on purpose derives from :class:`LosskitError`. Config problems are also
``ValueError``; unknown names are also ``LookupError`` (not ``KeyError``, whose message prints in quotes).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "ConfigError",
    "CriterionConflictError",
    "InputError",
    "LosskitError",
    "PluginError",
    "Problem",
    "UnknownCriterionError",
]


class LosskitError(Exception):
    """Base class of every error raised by losskit and its plugins."""


@dataclass(frozen=True)
class Problem:
    """One problem found in a loss config.

    Attributes:
        path: where in the config, e.g. ``model.losses[1].gamma``.
        message: what was given and what is allowed.
        source: the file the config came from, if any.
        line: 1-based line in ``source``, where known.
    """

    path: str
    message: str
    source: str | None = None
    line: int | None = None
    criterion: str | None = None

    def __str__(self) -> str:
        where = ""
        if self.source is not None:
            where = f"{self.source}:{self.line}: " if self.line is not None else f"{self.source}: "
        elif self.line is not None:
            where = f"line {self.line}: "
        path = self.path
        if self.criterion:
            path = f"{path} ({self.criterion})" if path else f"({self.criterion})"
        return f"{where}{path}: {self.message}" if path else f"{where}{self.message}"


class ConfigError(LosskitError, ValueError):
    """A loss config (or criterion arguments) is invalid; lists every problem at once."""

    def __init__(self, problems: Iterable[Problem] | str) -> None:
        if isinstance(problems, str):
            problems = [Problem("", problems)]
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__(self._format())

    def _format(self) -> str:
        if len(self.problems) == 1:
            return str(self.problems[0])
        lines = [f"invalid loss config: {len(self.problems)} problems"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class UnknownCriterionError(LosskitError, LookupError):
    """A criterion name is not registered."""

    def __init__(self, message: str, *, name: str, suggestions: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.name = name
        self.suggestions = tuple(suggestions)

    def __str__(self) -> str:  # LookupError subclasses would otherwise print fine; keep it explicit
        return str(self.args[0])


class CriterionConflictError(LosskitError):
    """Two providers registered the same criterion name."""


class PluginError(LosskitError):
    """A plugin could not be loaded or its hook failed."""


class InputError(LosskitError, ValueError):
    """A criterion received malformed ``out``/``target`` inputs.

    The message starts with the criterion name and the offending key, e.g.
    ``yolox_loss: out['pred'][1]: expected 85 channels (5 + C), got shape (2, 84, 40, 40)``.
    """

    def __init__(self, criterion: str, key: str, message: str) -> None:
        self.criterion = criterion
        self.key = key
        prefix = f"{criterion}: {key}: " if key else f"{criterion}: "
        super().__init__(prefix + message)
