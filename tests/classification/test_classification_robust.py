# SPDX-License-Identifier: Apache-2.0
"""Finite in, finite out (issue 18): the robustness matrix for cross_entropy and focal_loss."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from losskit import Criterion
from losskit.testing import check_robustness
from losskit_classification import CrossEntropy, FocalLoss

FACTORIES: dict[str, Callable[[], Criterion]] = {
    "cross_entropy": CrossEntropy,
    "cross_entropy weighted smoothed": lambda: CrossEntropy(
        label_smoothing=0.1, class_weights=[1.0, 2.0, 0.5, 1.0, 1.0]
    ),
    "cross_entropy across ranks": lambda: CrossEntropy(normalize_across_ranks=True),
    "focal_loss": FocalLoss,
    "focal_loss gamma 0.5": lambda: FocalLoss(gamma=0.5, alpha=-1.0),
}


@pytest.mark.parametrize("name", list(FACTORIES))
def test_robustness_matrix(name) -> None:
    report = check_robustness(FACTORIES[name])
    for mode in ("on", "off"):
        assert report.runs[mode] == report.typed_errors[mode] + report.results[mode] > 15
