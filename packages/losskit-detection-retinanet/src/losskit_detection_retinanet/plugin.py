# SPDX-License-Identifier: Apache-2.0
"""losskit entry point (``retinanet``): registers ``retinanet_loss``."""

from __future__ import annotations

from losskit import hookimpl
from losskit.hookspecs import Register
from losskit_detection_retinanet.retinanet import RetinaNetLoss


@hookimpl
def register_criteria(register: Register) -> None:
    register(RetinaNetLoss)
