# SPDX-License-Identifier: Apache-2.0
"""An example third-party losskit plugin providing ``charbonnier_loss``."""

from losskit_charbonnier.charbonnier import CharbonnierLoss, CharbonnierLossConfig, charbonnier_loss

__all__ = ["CharbonnierLoss", "CharbonnierLossConfig", "charbonnier_loss"]
