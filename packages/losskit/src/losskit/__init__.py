# SPDX-License-Identifier: Apache-2.0
"""losskit: loss functions for detection, segmentation and classification, built from YAML configs.

Importing ``losskit`` scans no plugins; discovery happens on the first registry lookup.
"""

from __future__ import annotations

from losskit.checks import set_value_checks, value_checks_enabled
from losskit.composite import CompositeLoss, LossResult, build_losses
from losskit.config import LossConfig, LossEntry, load_config
from losskit.criterion import Criterion, LossTerms
from losskit.errors import (
    ConfigError,
    CriterionConflictError,
    InputError,
    LosskitError,
    PluginError,
    Problem,
    UnknownCriterionError,
)
from losskit.hookspecs import hookimpl, hookspec
from losskit.registry import CriterionInfo, Registry, get_plugin_manager, get_registry, register_criterion
from losskit.schema import option

__version__ = "0.1.0"

__all__ = [
    "CompositeLoss",
    "ConfigError",
    "Criterion",
    "CriterionConflictError",
    "CriterionInfo",
    "InputError",
    "LossConfig",
    "LossEntry",
    "LossResult",
    "LossTerms",
    "LosskitError",
    "PluginError",
    "Problem",
    "Registry",
    "UnknownCriterionError",
    "__version__",
    "build_losses",
    "get_plugin_manager",
    "get_registry",
    "hookimpl",
    "hookspec",
    "load_config",
    "option",
    "register_criterion",
    "set_value_checks",
    "value_checks_enabled",
]
