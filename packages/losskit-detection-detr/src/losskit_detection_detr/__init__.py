# SPDX-License-Identifier: Apache-2.0
"""losskit-detection-detr: the RT-DETR set criterion with Hungarian matching."""

from __future__ import annotations

from losskit_detection_detr.detr import (
    CostWeights,
    DetrLoss,
    DetrLossConfig,
    LossWeights,
    MatcherConfig,
    Matches,
    detr_loss,
    detr_match,
)

__version__ = "0.1.0"

__all__ = [
    "CostWeights",
    "DetrLoss",
    "DetrLossConfig",
    "LossWeights",
    "MatcherConfig",
    "Matches",
    "__version__",
    "detr_loss",
    "detr_match",
]
