# SPDX-License-Identifier: Apache-2.0
"""losskit plugin providing ``pidnet_loss``, the loss of PIDNet (Xu et al., CVPR 2023)."""

from __future__ import annotations

from losskit_ops import upsampled_nll  # moved to losskit-ops; re-exported for existing imports
from losskit_segmentation_pidnet.pidnet import PIDNetLoss, PIDNetLossConfig, pidnet_loss

__all__ = ["PIDNetLoss", "PIDNetLossConfig", "pidnet_loss", "upsampled_nll"]
