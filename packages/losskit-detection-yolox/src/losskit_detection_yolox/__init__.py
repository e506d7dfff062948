# SPDX-License-Identifier: Apache-2.0
"""losskit-detection-yolox: the YOLOX and YOLO-Fastest losses with batched SimOTA assignment."""

from __future__ import annotations

from losskit_detection_yolox._assign import Assignment
from losskit_detection_yolox.yolofastest import (
    YOLOFastestLoss,
    YOLOFastestLossConfig,
    yolofastest_assign,
    yolofastest_loss,
)
from losskit_detection_yolox.yolox import YOLOXLoss, YOLOXLossConfig, yolox_assign, yolox_loss

__version__ = "0.1.0"

__all__ = [
    "Assignment",
    "YOLOFastestLoss",
    "YOLOFastestLossConfig",
    "YOLOXLoss",
    "YOLOXLossConfig",
    "__version__",
    "yolofastest_assign",
    "yolofastest_loss",
    "yolox_assign",
    "yolox_loss",
]
