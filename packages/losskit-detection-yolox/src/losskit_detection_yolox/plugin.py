# SPDX-License-Identifier: Apache-2.0
"""losskit entry point of losskit-detection-yolox: registers ``yolox_loss`` and ``yolofastest_loss``."""

from __future__ import annotations

from losskit import hookimpl
from losskit.hookspecs import Register
from losskit_detection_yolox.yolofastest import YOLOFastestLoss
from losskit_detection_yolox.yolox import YOLOXLoss


@hookimpl
def register_criteria(register: Register) -> None:
    register(YOLOXLoss)
    register(YOLOFastestLoss)
