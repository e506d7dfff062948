# SPDX-License-Identifier: Apache-2.0
"""The plugin module named by the ``classification`` entry point: registers the criteria."""

from __future__ import annotations

from typing import Any

from losskit import hookimpl
from losskit_classification.cross_entropy import CrossEntropy
from losskit_classification.focal import FocalLoss


@hookimpl
def register_criteria(register: Any) -> None:
    """Register ``cross_entropy`` and ``focal_loss``."""
    register(CrossEntropy)
    register(FocalLoss)
