# SPDX-License-Identifier: Apache-2.0
"""Hook specification and markers of the ``losskit`` plugin system.

A plugin is a module exposed through the ``losskit`` entry-point group; it implements
:func:`register_criteria` with ``@losskit.hookimpl``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import pluggy

if TYPE_CHECKING:
    from losskit.criterion import Criterion

PROJECT_NAME = "losskit"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


class Register(Protocol):
    """The callback handed to :func:`register_criteria`."""

    def __call__(self, criterion: type[Criterion], *, name: str | None = None) -> None: ...


@hookspec
def register_criteria(register: Register) -> None:
    """Register this plugin's criteria.

    Call ``register(CriterionClass)`` once per criterion; the name defaults to the class's ``name``
    attribute. The core records which plugin and distribution provided each name and rejects duplicates.
    """
