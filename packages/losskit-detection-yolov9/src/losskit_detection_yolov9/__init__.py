# SPDX-License-Identifier: Apache-2.0
"""losskit-detection-yolov9: the YOLOv9 loss (task-aligned assignment, DFL, CIoU), batched."""

from __future__ import annotations

from losskit_detection_yolov9._assign import Assignment
from losskit_detection_yolov9.yolov9 import YOLOv9Loss, YOLOv9LossConfig, yolov9_assign, yolov9_loss

__version__ = "0.1.0"

__all__ = ["Assignment", "YOLOv9Loss", "YOLOv9LossConfig", "__version__", "yolov9_assign", "yolov9_loss"]
