# SPDX-License-Identifier: Apache-2.0
"""losskit-segmentation: NetsPresso Trainer's segmentation cross-entropy, ``seg_cross_entropy``."""

from __future__ import annotations

from losskit_segmentation.seg_cross_entropy import (
    SegCrossEntropy,
    SegCrossEntropyConfig,
    seg_cross_entropy,
)

__version__ = "0.1.0"

__all__ = ["SegCrossEntropy", "SegCrossEntropyConfig", "__version__", "seg_cross_entropy"]
