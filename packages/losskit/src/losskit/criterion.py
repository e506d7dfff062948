# SPDX-License-Identifier: Apache-2.0
"""The criterion protocol: the base class every losskit loss derives from."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import Tensor, nn

from losskit.checks import integral_scalar
from losskit.errors import ConfigError, LosskitError, Problem
from losskit.schema import validate_config

__all__ = ["ConfigT", "Criterion", "LossTerms"]

#: The config dataclass type of a criterion.
ConfigT = TypeVar("ConfigT")


class LossTerms(dict[str, Tensor]):
    """Named scalar loss terms whose sum is a criterion's loss, plus diagnostics kept apart.

    It is a plain ``dict`` of terms (``{"iou": ..., "obj": ...}``); ``diagnostics`` holds values that are
    not loss terms (e.g. the number of foreground anchors), detached.
    """

    def __init__(self, terms: Mapping[str, Tensor], diagnostics: Mapping[str, Tensor] | None = None) -> None:
        super().__init__(terms)
        self.diagnostics: dict[str, Tensor] = dict(diagnostics or {})

    @property
    def total(self) -> Tensor:
        """The sum of the terms (the criterion's loss), like :attr:`losskit.LossResult.total`."""
        values = list(self.values())
        if not values:
            raise LosskitError("LossTerms.total: there are no terms to sum")
        result = values[0]
        for v in values[1:]:
            result = result + v
        return result


class Criterion(nn.Module, Generic[ConfigT]):
    """Base class of losskit criteria.

    Subclasses set:

    * ``name``: the registered name (``"focal_loss"``);
    * ``Config``: a frozen dataclass of fields made with :func:`losskit.schema.option`, the one place
      where the defaults live. Declare it at module level and attach it, so that the functional form
      can read its defaults and the criterion is typed by it::

          @dataclass(frozen=True)
          class FocalLossConfig:
              gamma: float = option(2.0, ge=0.0, doc="Focusing parameter.")

          def focal_loss(pred, target, *, gamma: float = FocalLossConfig.gamma): ...

          class FocalLoss(Criterion[FocalLossConfig]):
              Config = FocalLossConfig

    * ``inputs`` / ``targets``: the expected ``out`` / ``target`` keys with a one-line description;
    * ``terms``: the fixed names of the terms returned (empty when ``forward`` returns one tensor);
    * ``diagnostics``: the fixed names of the diagnostics returned in :class:`LossTerms`.

    and implement ``forward(out, target)`` and ``example()``. The constructor takes a ``Config``
    instance or its fields as keyword arguments, validated against the schema::

        FocalLoss(gamma=1.0)          # same checks as the YAML config
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[Any]]
    inputs: ClassVar[Mapping[str, str]] = {}
    targets: ClassVar[Mapping[str, str]] = {}
    terms: ClassVar[tuple[str, ...]] = ()
    diagnostics: ClassVar[tuple[str, ...]] = ()

    config: ConfigT

    def __init__(self, config: ConfigT | None = None, /, **fields: Any) -> None:
        super().__init__()
        self.config = self.make_config(config, **fields)
        self.epoch = 0

    @classmethod
    def make_config(cls, config: ConfigT | None = None, /, **fields: Any) -> ConfigT:
        """Validate ``fields`` (or a ready ``Config``) against the schema; raise :class:`ConfigError`."""
        if config is not None:
            if not isinstance(config, cls.Config):
                raise ConfigError(
                    f"{cls.name}: expected a {cls.__name__}.Config, got {type(config).__name__}"
                )
            fields = {**dataclasses.asdict(config), **fields}
        problems: list[Problem] = []

        def report(field: str, message: str) -> None:
            problems.append(Problem(f"{cls.name}.{field}" if field else cls.name, message))

        instance = validate_config(cls.Config, fields, report=report)
        if problems:
            raise ConfigError(problems)
        return instance

    def register_config_buffer(
        self, name: str, values: Sequence[float] | None, *, dtype: torch.dtype
    ) -> None:
        """Hold a config field's numbers (``class_weights``) as a tensor attribute ``name`` that follows
        ``.to(device)`` (no host-to-device copy per call), ``None`` when the field is null.

        The buffer is not persistent: the config is the source of truth, so a checkpoint loads
        whatever the configured values are.
        """
        tensor = None if values is None else torch.tensor(values, dtype=dtype)
        self.register_buffer(name, tensor, persistent=False)

    def term_names(self) -> tuple[str, ...]:
        """The names of the terms this criterion returns for its config (fixed across calls)."""
        return self.terms

    def diagnostic_names(self) -> tuple[str, ...]:
        """The names of the diagnostics this criterion returns (fixed across calls)."""
        return self.diagnostics

    def set_epoch(self, epoch: int) -> None:
        """Tell the criterion the current training epoch (0-based): any integral scalar ``>= 0`` (an
        ``int``, a numpy integer, a 0-d integer tensor), stored as an ``int``."""
        value = integral_scalar(epoch)
        if value is None or value < 0:
            raise ConfigError(f"{self.name}: set_epoch expects an int >= 0, got {epoch!r}")
        self.epoch = value

    def example(
        self,
        batch_size: int = 2,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """A small valid ``(out, target)`` for this criterion; model outputs require grad."""
        raise NotImplementedError(f"{type(self).__name__} does not provide an example")

    def extra_repr(self) -> str:
        if not dataclasses.is_dataclass(self.config):
            return ""
        changed = []
        for f in dataclasses.fields(self.config):
            value = getattr(self.config, f.name)
            if value != f.default:
                changed.append(f"{f.name}={value!r}")
        return ", ".join(changed)
