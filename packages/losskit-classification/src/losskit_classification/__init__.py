# SPDX-License-Identifier: Apache-2.0
"""losskit-classification: ``cross_entropy`` and a fast sigmoid ``focal_loss`` for losskit.

The functional forms are public: :func:`sigmoid_focal_loss` (dense targets),
:func:`sigmoid_focal_loss_indexed` (class-index targets, no dense one-hot; used by dense detectors)
and :func:`cross_entropy`.
"""

from __future__ import annotations

from losskit_classification.cross_entropy import CrossEntropy, CrossEntropyConfig, cross_entropy
from losskit_classification.focal import (
    FocalLoss,
    FocalLossConfig,
    focal_loss,
    sigmoid_focal_loss,
    sigmoid_focal_loss_indexed,
    sigmoid_focal_loss_reference,
)

__version__ = "0.1.0"

__all__ = [
    "CrossEntropy",
    "CrossEntropyConfig",
    "FocalLoss",
    "FocalLossConfig",
    "__version__",
    "cross_entropy",
    "focal_loss",
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_indexed",
    "sigmoid_focal_loss_reference",
]
