# SPDX-License-Identifier: Apache-2.0
"""The shared robustness matrix (``losskit.testing.check_robustness``) for retinanet_loss, both modes."""

from __future__ import annotations

import pytest

from losskit.testing import check_robustness
from losskit_detection_retinanet import RetinaNetLoss


@pytest.mark.parametrize(
    "cfg",
    [{}, {"box_loss": "smooth_l1"}, {"box_loss": "giou"}, {"box_loss": "ciou", "normalizer": "batch"}],
    ids=["l1", "smooth_l1", "giou", "ciou-batch"],
)
def test_robustness_matrix(cfg):
    report = check_robustness(lambda: RetinaNetLoss(**cfg), batch_size=3)
    assert report.failures == []
    for mode in ("on", "off"):
        assert report.runs[mode] == report.typed_errors[mode] + report.results[mode] > 50
    # value checks reject what the defined treatment handles when they are off (invalid boxes, labels)
    assert report.typed_errors["on"] > report.typed_errors["off"]
    assert report.results["off"] > report.results["on"]
