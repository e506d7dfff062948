# SPDX-License-Identifier: Apache-2.0
"""The robustness matrix (losskit.testing.check_robustness) on rtmcc_loss, default and other configs."""

from __future__ import annotations

import pytest

from losskit.testing import check_robustness
from losskit_pose_rtmcc import RTMCCLoss


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"input_size": (24, 32), "sigma": (1.5, 2.0), "normalize": True, "label_softmax": False},
        {"normalizer": "instances_and_keypoints", "use_target_weight": False, "mask": (0, 5)},
    ],
    ids=["defaults", "non-square-normalized", "instances-mask"],
)
def test_robustness_matrix(fields: dict) -> None:
    report = check_robustness(lambda: RTMCCLoss(**fields))
    assert report.failures == []
    assert report.runs["on"] > 10 and report.runs["off"] == report.runs["on"]
