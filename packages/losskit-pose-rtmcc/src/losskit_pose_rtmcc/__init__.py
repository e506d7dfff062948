# SPDX-License-Identifier: Apache-2.0
"""losskit-pose-rtmcc: ``rtmcc_loss``, the SimCC KL loss of RTMPose's RTMCC head.

The functional forms are public: :func:`rtmcc_loss` (the loss of a batch) and :func:`simcc_encode`
(the keypoint weights and SimCC centres the loss uses).
"""

from __future__ import annotations

from losskit_pose_rtmcc.rtmcc import (
    RTMCCLoss,
    RTMCCLossConfig,
    SimCCTargets,
    rtmcc_loss,
    simcc_bins,
    simcc_encode,
)

__version__ = "0.1.0"

__all__ = [
    "RTMCCLoss",
    "RTMCCLossConfig",
    "SimCCTargets",
    "__version__",
    "rtmcc_loss",
    "simcc_bins",
    "simcc_encode",
]
