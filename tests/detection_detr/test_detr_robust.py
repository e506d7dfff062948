# SPDX-License-Identifier: Apache-2.0
"""detr_loss through losskit's robustness matrix (every mutation, value checks on and off)."""

from __future__ import annotations

import pytest

from losskit.testing import check_robustness
from losskit_detection_detr import DetrLoss


@pytest.mark.parametrize("losses", [("vfl", "boxes"), ("focal", "boxes")])
def test_robustness_matrix(losses: tuple[str, ...]) -> None:
    report = check_robustness(lambda: DetrLoss(losses=list(losses)))
    assert report.runs["on"] > 50 and report.typed_errors["on"] > 0 and report.results["off"] > 0
