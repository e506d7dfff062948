# SPDX-License-Identifier: Apache-2.0
"""Entry point of the ``losskit-segmentation-pidnet`` plugin (group ``losskit``, name ``pidnet``)."""

from __future__ import annotations

from losskit import hookimpl
from losskit.hookspecs import Register
from losskit_segmentation_pidnet.pidnet import PIDNetLoss


@hookimpl
def register_criteria(register: Register) -> None:
    """Register ``pidnet_loss``."""
    register(PIDNetLoss)
