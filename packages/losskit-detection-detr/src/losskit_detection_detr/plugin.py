# SPDX-License-Identifier: Apache-2.0
"""losskit entry point of losskit-detection-detr: registers ``detr_loss``."""

from __future__ import annotations

from losskit import hookimpl
from losskit.hookspecs import Register
from losskit_detection_detr.detr import DetrLoss


@hookimpl
def register_criteria(register: Register) -> None:
    register(DetrLoss)
