# SPDX-License-Identifier: Apache-2.0
"""``build_losses``: a config becomes one weighted composite loss module."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

from losskit.checks import integral_scalar
from losskit.config import load_config, unexpected_keyword_message
from losskit.criterion import Criterion, LossTerms
from losskit.errors import ConfigError, LosskitError, Problem
from losskit.registry import Registry

__all__ = ["CompositeLoss", "LossResult", "build_losses"]


@dataclass
class LossResult:
    """What a :class:`CompositeLoss` returns.

    Attributes:
        total: the weighted sum of the criteria, a scalar carrying gradients.
        parts: detached scalars for logging: ``"<name>"`` (each criterion's unweighted value),
            ``"<name>/<term>"`` (each term) and ``"total"``.
        diagnostics: detached values that are not loss terms, keyed ``"<name>/<diagnostic>"``.
        losses: each criterion's unweighted value with its graph (for per-loss gradient tools).
    """

    total: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)
    diagnostics: dict[str, Tensor] = field(default_factory=dict)
    losses: dict[str, Tensor] = field(default_factory=dict)


class CompositeLoss(nn.Module):
    """Weighted sum of named criteria; ``composite(out, target)`` returns a :class:`LossResult`.

    No host-device synchronisation happens here: every value stays a tensor.
    """

    def __init__(self, entries: Sequence[tuple[str, Criterion, float]]) -> None:
        super().__init__()
        if not entries:
            raise ConfigError("CompositeLoss needs at least one criterion")
        self.criteria = nn.ModuleDict()
        self.weights: dict[str, float] = {}
        for name, criterion, weight in entries:
            if name in self.criteria:
                raise ConfigError(f"duplicate loss name {name!r}")
            self.criteria[name] = criterion
            self.weights[name] = float(weight)

    def __getitem__(self, name: str) -> Criterion:
        return self.criteria[name]  # type: ignore[return-value]

    def __iter__(self) -> Iterator[str]:
        return iter(self.criteria)

    def __len__(self) -> int:
        return len(self.criteria)

    def forward(self, out: Mapping[str, Any], target: Mapping[str, Any]) -> LossResult:
        return self.combine({name: crit(out, target) for name, crit in self.criteria.items()})

    def combine(self, values: Mapping[str, Tensor | Mapping[str, Tensor]]) -> LossResult:
        """Weight and sum the raw results of the criteria (one per name, in any order)."""
        total: Tensor | None = None
        parts: dict[str, Tensor] = {}
        diagnostics: dict[str, Tensor] = {}
        losses: dict[str, Tensor] = {}
        for name, criterion in self.criteria.items():
            if name not in values:
                raise LosskitError(f"no value given for loss {name!r}")
            value = self._value(name, criterion, values[name], parts, diagnostics)  # type: ignore[arg-type]
            losses[name] = value
            parts[name] = value.detach()
            weight = self.weights[name]
            weighted = value if weight == 1.0 else value * weight
            total = weighted if total is None else total + weighted
        if total is None:  # pragma: no cover - the constructor forbids an empty composite
            raise LosskitError("empty composite")
        parts["total"] = total.detach()
        return LossResult(total, parts, diagnostics, losses)

    @staticmethod
    def _value(
        name: str,
        criterion: Criterion,
        result: Tensor | Mapping[str, Tensor],
        parts: dict[str, Tensor],
        diagnostics: dict[str, Tensor],
    ) -> Tensor:
        expected = criterion.term_names()
        if isinstance(result, Tensor):
            if expected:
                raise LosskitError(
                    f"{criterion.name}: returned one tensor but declares terms {list(expected)}"
                )
            if result.dim() != 0:
                raise LosskitError(
                    f"{criterion.name}: returned a tensor of shape {tuple(result.shape)}, not a scalar"
                )
            return result
        if not isinstance(result, Mapping):
            raise LosskitError(
                f"{criterion.name}: returned {type(result).__name__}, not a tensor or a mapping"
            )
        if tuple(result) != tuple(expected):
            raise LosskitError(
                f"{criterion.name}: returned terms {list(result)} but declares {list(expected)}"
            )
        value: Tensor | None = None
        for term, t in result.items():
            if t.dim() != 0:
                raise LosskitError(
                    f"{criterion.name}: term {term!r} has shape {tuple(t.shape)}, not a scalar"
                )
            parts[f"{name}/{term}"] = t.detach()
            value = t if value is None else value + t
        diag = result.diagnostics if isinstance(result, LossTerms) else {}
        expected_diag = criterion.diagnostic_names()
        if tuple(diag) != tuple(expected_diag):
            raise LosskitError(
                f"{criterion.name}: returned diagnostics {list(diag)} but declares {list(expected_diag)}"
            )
        for key, d in diag.items():
            diagnostics[f"{name}/{key}"] = d.detach()
        if value is None:
            raise LosskitError(f"{criterion.name}: returned no terms")
        return value

    def set_epoch(self, epoch: int) -> None:
        """Pass the current epoch (any integral scalar >= 0, as :meth:`Criterion.set_epoch`) to every
        criterion."""
        value = integral_scalar(epoch)
        if value is None or value < 0:
            raise ConfigError(f"set_epoch expects an int >= 0, got {epoch!r}")
        epoch = value
        for criterion in self.criteria.values():
            criterion.set_epoch(epoch)  # type: ignore[operator]

    def extra_repr(self) -> str:
        return "weights=" + repr(self.weights)

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}("]
        for name, crit in self.criteria.items():
            lines.append(f"  ({name}, weight={self.weights[name]:g}): {crit!r}")
        lines.append(")")
        return "\n".join(lines)


def build_losses(
    config: Any,
    *,
    registry: Registry | None = None,
    device: torch.device | str | None = None,
    epoch: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    **unexpected: NoReturn,
) -> CompositeLoss:
    """Build the weighted composite loss from a config.

    Args:
        config: anything :func:`losskit.load_config` takes: a YAML path or string, or any mapping or
            sequence (plain ``dict``/``list``, OmegaConf ``DictConfig``/``ListConfig``, a Hydra config).
        registry: where criteria are looked up (default: the process-wide registry).
        device: move the composite there.
        epoch: the first ``set_epoch`` (later epochs: ``loss.set_epoch(epoch)``).
        overrides: field values given to every criterion that declares the field, over the config's
            values (e.g. ``{"ignore_index": 255}``); a key that no criterion declares is an error.

    Raises:
        ConfigError: every problem in the config, with locations; also for a keyword argument that is
            not one of the above, saying what to use instead.
    """
    if unexpected:
        raise ConfigError([Problem("", unexpected_keyword_message(key)) for key in unexpected])
    loaded = load_config(config, registry=registry, overrides=overrides)
    composite = CompositeLoss([(e.name, e.build(), e.weight) for e in loaded.entries])
    if device is not None:
        composite.to(torch.device(device))
    if epoch is not None:
        composite.set_epoch(epoch)
    return composite
