# SPDX-License-Identifier: Apache-2.0
"""losskit plugin: RetinaNet's loss (``retinanet_loss``), torchvision's values, batched over images."""

from __future__ import annotations

from losskit_detection_retinanet.retinanet import (
    RetinaNetLoss,
    RetinaNetLossConfig,
    RetinaNetLossOutput,
    retinanet_loss,
)

__all__ = ["RetinaNetLoss", "RetinaNetLossConfig", "RetinaNetLossOutput", "retinanet_loss"]
__version__ = "0.1.0"
