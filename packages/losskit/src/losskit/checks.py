# SPDX-License-Identifier: Apache-2.0
"""Helpers criteria use to validate ``out``/``target`` inputs with clear errors.

Shape, dtype and key checks are free (no device sync) and always run. *Value* checks (class indices in
range, finite boxes) read tensor values, which forces a host-device sync on accelerators. They are
governed by the ``LOSSKIT_VALUE_CHECKS`` environment variable or :func:`set_value_checks`:

* ``auto`` (default): run value checks for CPU tensors only (no sync cost there), and not while
  ``torch.compile`` traces the code (a read of a value would break the graph);
* ``always``: also on accelerators (debugging; costs a sync per check);
* ``never``: skip them everywhere.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from losskit.errors import ConfigError, InputError

__all__ = [
    "check_same_device",
    "explain_non_finite",
    "fmt_shape",
    "get_box_targets",
    "get_img_size",
    "get_levels",
    "get_tensor",
    "integral_scalar",
    "missing_key_error",
    "reads_are_free",
    "real_scalar",
    "set_value_checks",
    "value_checks_enabled",
]

try:
    from torch.compiler import is_compiling as _is_compiling
except ImportError:  # torch < 2.3 has no public flag: compiled code breaks its graph at reads, as it did

    def _is_compiling() -> bool:
        return False


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


def reads_are_free(tensor: Tensor) -> bool:
    """Whether reading ``tensor``'s values on the host costs nothing: a CPU tensor (no device to wait
    for), outside ``torch.compile`` tracing (where a read would break the graph).

    The one place that decides it: value checks in ``auto`` mode and the criteria's CPU-only reads
    (cross_entropy's read-back, YOLOX's exact candidate sizing) all ask here.
    """
    return tensor.is_cpu and not _is_compiling()


def value_checks_enabled(tensor: Tensor) -> bool:
    """Whether checks that read ``tensor``'s values should run (see the module doc)."""
    mode = _mode()
    if mode == "never":
        return False
    return mode == "always" or reads_are_free(tensor)


def fmt_shape(shape: torch.Size | tuple[int, ...]) -> str:
    """``(2, 3, 4)`` for a shape."""
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def missing_key_error(
    criterion: str, where: str, key: str, mapping: Mapping[Any, Any], expected: str | None = None
) -> InputError:
    """The error for ``where[key]`` missing from ``mapping``: it lists the keys that are there.

    ``where`` is the path of the mapping (``"out"``, ``"target['gt'][3]"``); the message reads
    ``out['pred']: missing; out has keys 'logits', 'aux'; expected: (B, C, H, W) logits``.
    """
    keys = ", ".join(repr(k) for k in mapping) or "none"
    tail = f"; expected: {expected}" if expected else ""
    return InputError(criterion, f"{where}[{key!r}]", f"missing; {where} has keys {keys}{tail}")


def check_same_device(
    criterion: str, reference: tuple[str, Tensor], *others: tuple[str, Tensor | None]
) -> None:
    """Raise :class:`InputError` naming both keys and devices when an input is not on the device of
    ``reference`` (``("out['pred']", pred)``). Reads only attributes: no device sync."""
    ref_name, ref = reference
    for name, t in others:
        if t is not None and t.device != ref.device:
            raise InputError(
                criterion,
                name,
                f"is on {t.device}, but {ref_name} is on {ref.device}; move both to the same device",
            )


def explain_non_finite(
    criterion: str, named_tensors: Iterable[tuple[str, Tensor | None]]
) -> InputError | None:
    """The :class:`InputError` naming the first of ``named_tensors`` (``("out['pred']", pred)`` pairs)
    that holds NaN or inf, or ``None`` when every one is finite (``None`` entries are skipped).

    For a criterion whose loss came out non-finite, to name the input behind it:
    ``raise explain_non_finite(name, [("out['pred']", pred), ...]) or InputError(name, key, why)``.
    It reads values (a host sync on accelerators): call it only where value checks run.
    """
    for where, t in named_tensors:
        if t is not None and not bool(torch.isfinite(t).all()):
            return InputError(criterion, where, "contains non-finite values (NaN or inf)")
    return None


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
        raise missing_key_error(criterion, side, key, mapping, expected)
    value = mapping[key]
    if not isinstance(value, Tensor):
        raise InputError(criterion, where, f"expected a tensor ({expected}), got {type(value).__name__}")
    if float_only and not value.is_floating_point():
        raise InputError(
            criterion, where, f"expected a floating-point tensor ({expected}), got {value.dtype}"
        )
    return value


def get_box_targets(
    target: Any,
    key: str = "gt",
    *,
    criterion: str,
    batch: int,
    batch_of: str,
) -> tuple[list[Tensor], list[Tensor]]:
    """The boxes and labels of ``target[key]``, a list of ``batch`` dicts ``{"boxes", "labels"}``.

    Checks the structure, shapes and dtypes (no values, so no device sync): ``boxes`` is ``(n_i, 4)`` of a
    real dtype, ``labels`` is ``(n_i,)`` of an integer dtype. ``batch_of`` names the output whose batch
    size ``batch`` is, for the message. Raises :class:`InputError` naming the exact entry and key.
    """
    expected = "a list of B dicts {'boxes': (n, 4) xyxy, 'labels': (n,) int64}"
    if not isinstance(target, Mapping):
        raise InputError(
            criterion, "target", f"expected a mapping with key {key!r}, got {type(target).__name__}"
        )
    where = f"target[{key!r}]"
    if key not in target:
        raise missing_key_error(criterion, "target", key, target, expected)
    items = target[key]
    if isinstance(items, (str, bytes, Mapping, Tensor)) or not isinstance(items, Sequence):
        raise InputError(criterion, where, f"expected {expected}, got {type(items).__name__}")
    if len(items) != batch:
        raise InputError(
            criterion, where, f"expected {batch} entries (the batch size of {batch_of}), got {len(items)}"
        )
    boxes_list, labels_list = [], []
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        if not isinstance(item, Mapping):
            raise InputError(
                criterion, at, f"expected a dict with 'boxes' and 'labels', got {type(item).__name__}"
            )
        for name in ("boxes", "labels"):
            if name not in item:
                raise missing_key_error(criterion, at, name, item)
            if not isinstance(item[name], Tensor):
                raise InputError(
                    criterion, f"{at}[{name!r}]", f"expected a tensor, got {type(item[name]).__name__}"
                )
        boxes, labels = item["boxes"], item["labels"]
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise InputError(
                criterion, f"{at}['boxes']", f"expected shape (n, 4) xyxy, got shape {fmt_shape(boxes.shape)}"
            )
        if boxes.dtype == torch.bool or boxes.is_complex():
            raise InputError(criterion, f"{at}['boxes']", f"expected real-valued boxes, got {boxes.dtype}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise InputError(criterion, f"{at}['labels']", f"expected an integer tensor, got {labels.dtype}")
        if labels.dim() != 1 or labels.shape[0] != boxes.shape[0]:
            raise InputError(
                criterion,
                f"{at}['labels']",
                f"expected shape ({boxes.shape[0]},) (one per box), got shape {fmt_shape(labels.shape)}",
            )
        boxes_list.append(boxes)
        labels_list.append(labels)
    return boxes_list, labels_list


def _integral_value(value: Any) -> int | None:
    if isinstance(value, bool):  # numpy's bool is no numbers.Integral either
        return None
    if isinstance(value, Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            return None
        return int(value.item())  # a 0-d integer tensor (a read: free for the usual CPU tensor)
    if isinstance(value, numbers.Integral):  # int, numpy integers
        return int(value)
    return None


def integral_scalar(value: Any) -> int | None:
    """``value`` as an ``int`` when it is an integral scalar (``int``, a numpy integer, a 0-d integer
    tensor), else ``None``; ``bool`` is not an integer here."""
    return _integral_value(value)


def real_scalar(value: Any) -> float | None:
    """``value`` as a ``float`` when it is a real scalar (``int``, ``float``, a numpy number, a 0-d
    integer or floating tensor), else ``None``; ``bool`` and complex values are not."""
    as_int = _integral_value(value)
    if as_int is not None:
        return float(as_int)
    if isinstance(value, bool):
        return None
    if isinstance(value, Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            return None
        return float(value.item())
    if isinstance(value, numbers.Real):  # float, numpy floating
        return float(value)
    return None


def get_img_size(
    target: Any, *, criterion: str, key: str = "img_size", integral: bool = False
) -> tuple[float, float]:
    """``(H, W)`` of the network input from ``target[key]``: one size for both sides or a pair.

    Each size is a real scalar (``int``, ``float``, numpy number, 0-d tensor) or, with ``integral``,
    an integral one (the criterion divides by it with ``//``); a pair is a sequence or a ``(2,)``
    tensor. Raises :class:`InputError` naming the key for anything else, including non-positive or
    non-finite sizes. The detection criteria read the size once per call on the host: it is metadata,
    not model output (a size given as a CUDA tensor costs a transfer).
    """
    where = f"target[{key!r}]"
    expected = "an int or (H, W) of the network input" + (" (integers)" if integral else "")
    if not isinstance(target, Mapping):
        raise InputError(
            criterion, "target", f"expected a mapping with key {key!r}, got {type(target).__name__}"
        )
    if key not in target:
        raise missing_key_error(criterion, "target", key, target, expected)
    size = target[key]
    scalar = integral_scalar if integral else real_scalar
    single = scalar(size)
    if single is not None:
        hw: tuple[float | None, ...] = (single, single)
    elif (isinstance(size, Tensor) and size.shape == (2,)) or (
        isinstance(size, Sequence) and not isinstance(size, (str, bytes)) and len(size) == 2
    ):
        items = size.unbind() if isinstance(size, Tensor) else size
        hw = tuple(scalar(s) for s in items)
    else:
        hw = (None,)
    if any(s is None for s in hw):
        raise InputError(criterion, where, f"expected {expected}, got {size!r}")
    h, w = hw
    if not all(s is not None and math.isfinite(s) and s > 0 for s in (h, w)):
        raise InputError(criterion, where, f"expected positive finite sizes, got {size!r}")
    return h, w  # type: ignore[return-value]


def get_levels(
    pred: Any,
    key: str,
    *,
    criterion: str,
    shape: str,
    ndim: int = 4,
    channel_dim: int = 1,
    channels: str = "",
    rank_hint: str = "",
    allow_empty: bool = False,
    each: Callable[[int, Tensor], None] | None = None,
) -> list[Tensor]:
    """The list of pyramid levels ``pred`` found at ``key`` (``"out['pred']"``), checked for what every
    dense head shares: a sequence (not one tensor) of floating tensors of ``ndim`` dimensions with a
    non-empty grid (the last two), and the batch size, channel count (dim ``channel_dim``), device and
    dtype of level 0. The head's own channel layout stays the criterion's to check.

    Args:
        shape: one level's dims for messages, ``"(B, 5 + C, H, W)"``.
        channels: what the channel count is made of, for messages (``"5 + C"``).
        rank_hint: appended to the wrong-rank message when a level has ``ndim - 1`` dims.
        allow_empty: accept an empty list (else an error).
        each: the criterion's own check of level ``i``, called after the generic checks of that level
            and before it is compared with level 0 (so errors come in level order).

    Raises:
        InputError: naming ``key`` or the level (``out['pred'][1]``), what was given and what is expected.
    """
    expected = f"a list over pyramid levels of {shape} raw head outputs"
    if isinstance(pred, Tensor) or not isinstance(pred, Sequence) or isinstance(pred, (str, bytes)):
        given = (
            f"a tensor of shape {fmt_shape(pred.shape)}" if isinstance(pred, Tensor) else type(pred).__name__
        )
        raise InputError(criterion, key, f"expected {expected}, got {given}")
    if len(pred) == 0 and not allow_empty:
        raise InputError(criterion, key, f"expected {expected}, got an empty list")
    levels: list[Tensor] = []
    for i, p in enumerate(pred):
        where = f"{key}[{i}]"
        level = _level(p, where, criterion, shape, ndim, rank_hint)
        if each is not None:
            each(i, level)
        if levels:
            _same_as_first(level, levels[0], where, key, criterion, channel_dim, channels)
        levels.append(level)
    return levels


def _level(p: Any, where: str, criterion: str, shape: str, ndim: int, rank_hint: str) -> Tensor:
    if not isinstance(p, Tensor):
        raise InputError(criterion, where, f"expected a tensor {shape}, got {type(p).__name__}")
    if not p.is_floating_point():
        raise InputError(criterion, where, f"expected a floating-point tensor, got {p.dtype}")
    if p.dim() != ndim:
        hint = rank_hint if p.dim() == ndim - 1 else ""
        raise InputError(criterion, where, f"expected shape {shape}, got shape {fmt_shape(p.shape)}{hint}")
    if p.shape[-2] < 1 or p.shape[-1] < 1:
        raise InputError(criterion, where, f"expected a non-empty grid, got shape {fmt_shape(p.shape)}")
    return p


def _same_as_first(
    p: Tensor, first: Tensor, where: str, key: str, criterion: str, channel_dim: int, channels: str
) -> None:
    if p.shape[0] != first.shape[0]:
        raise InputError(criterion, where, f"batch size {p.shape[0]} differs from level 0's {first.shape[0]}")
    if p.shape[channel_dim] != first.shape[channel_dim]:
        made_of = f" ({channels})" if channels else ""
        raise InputError(
            criterion,
            where,
            f"expected {first.shape[channel_dim]} channels{made_of} as level 0, got shape {fmt_shape(p.shape)}",
        )
    if p.device != first.device:
        raise InputError(
            criterion, where, f"is on {p.device}, but {key}[0] is on {first.device}; move both to one device"
        )
    if p.dtype != first.dtype:
        raise InputError(criterion, where, f"dtype {p.dtype} differs from {key}[0]'s {first.dtype}")
