# SPDX-License-Identifier: Apache-2.0
"""Helpers criteria use to validate ``out``/``target`` inputs with clear errors.

Shape, dtype and key checks are free (no device sync) and always run. *Value* checks (class indices in
range, finite boxes) read tensor values, which forces a host-device sync on accelerators. They are
governed by the ``LOSSKIT_VALUE_CHECKS`` environment variable or :func:`set_value_checks`:

* ``auto`` (default): run value checks for CPU tensors only (no sync cost there);
* ``always``: also on accelerators (debugging; costs a sync per check);
* ``never``: skip them everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from losskit.errors import ConfigError, InputError

__all__ = ["fmt_shape", "get_tensor", "set_value_checks", "value_checks_enabled"]

ValueChecks = Literal["auto", "always", "never"]
_MODES = ("auto", "always", "never")
_override: ValueChecks | None = None


def set_value_checks(mode: ValueChecks | None) -> None:
    """Set the value-check mode for this process (``None`` returns to the environment's setting)."""
    global _override
    if mode is not None and mode not in _MODES:
        raise ConfigError(f"value checks: got {mode!r}; allowed: {', '.join(map(repr, _MODES))}")
    _override = mode


def _mode() -> str:
    if _override is not None:
        return _override
    mode = os.environ.get("LOSSKIT_VALUE_CHECKS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ConfigError(
            f"LOSSKIT_VALUE_CHECKS={mode!r} is not valid; allowed: {', '.join(map(repr, _MODES))}"
        )
    return mode


def value_checks_enabled(tensor: Tensor) -> bool:
    """Whether checks that read ``tensor``'s values should run (see the module doc)."""
    mode = _mode()
    if mode == "never":
        return False
    return mode == "always" or tensor.device.type == "cpu"


def fmt_shape(shape: torch.Size | tuple[int, ...]) -> str:
    """``(2, 3, 4)`` for a shape."""
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def get_tensor(
    mapping: Any,
    key: str,
    *,
    criterion: str,
    side: Literal["out", "target"],
    expected: str,
    float_only: bool = False,
) -> Tensor:
    """``mapping[key]`` as a tensor, or an :class:`InputError` that says what was expected."""
    where = f"{side}[{key!r}]"
    if not isinstance(mapping, Mapping):
        raise InputError(
            criterion, side, f"expected a mapping with key {key!r}, got {type(mapping).__name__}"
        )
    if key not in mapping:
        keys = ", ".join(repr(k) for k in mapping) or "none"
        raise InputError(criterion, where, f"missing; {side} has keys {keys}; expected: {expected}")
    value = mapping[key]
    if not isinstance(value, Tensor):
        raise InputError(criterion, where, f"expected a tensor ({expected}), got {type(value).__name__}")
    if float_only and not value.is_floating_point():
        raise InputError(
            criterion, where, f"expected a floating-point tensor ({expected}), got {value.dtype}"
        )
    return value
