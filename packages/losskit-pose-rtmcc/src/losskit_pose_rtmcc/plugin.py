# SPDX-License-Identifier: Apache-2.0
"""The plugin module named by the ``pose_rtmcc`` entry point: registers ``rtmcc_loss``."""

from __future__ import annotations

from typing import Any

from losskit import hookimpl
from losskit_pose_rtmcc.rtmcc import RTMCCLoss


@hookimpl
def register_criteria(register: Any) -> None:
    """Register ``rtmcc_loss``."""
    register(RTMCCLoss)
