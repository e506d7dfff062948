# SPDX-License-Identifier: Apache-2.0
"""The shared robustness matrix (missing keys, dtypes, ranks, empty batch, degenerate boxes, labels out
of range, NaN/inf, layouts, devices, threads) with value checks on and off, for both assigners and the
aux branch."""

from __future__ import annotations

import pytest

from losskit.testing import check_robustness
from losskit_detection_yolov9 import YOLOv9Loss


@pytest.mark.parametrize(
    "config", [{}, {"assigner": "upstream"}, {"aux_weight": 0.25}], ids=["netspresso", "upstream", "aux"]
)
def test_robustness_matrix(config: dict) -> None:
    report = check_robustness(lambda: YOLOv9Loss(**config))
    assert report.failures == []
