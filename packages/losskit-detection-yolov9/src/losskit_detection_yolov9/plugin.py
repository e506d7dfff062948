# SPDX-License-Identifier: Apache-2.0
"""losskit entry point of losskit-detection-yolov9: registers ``yolov9_loss``."""

from __future__ import annotations

from losskit import hookimpl
from losskit.hookspecs import Register
from losskit_detection_yolov9.yolov9 import YOLOv9Loss


@hookimpl
def register_criteria(register: Register) -> None:
    register(YOLOv9Loss)
