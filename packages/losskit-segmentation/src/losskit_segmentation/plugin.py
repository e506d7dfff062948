# SPDX-License-Identifier: Apache-2.0
"""The plugin module named by the ``losskit`` entry point ``segmentation``."""

from __future__ import annotations

from losskit import hookimpl
from losskit.hookspecs import Register
from losskit_segmentation.seg_cross_entropy import SegCrossEntropy


@hookimpl
def register_criteria(register: Register) -> None:
    register(SegCrossEntropy)
