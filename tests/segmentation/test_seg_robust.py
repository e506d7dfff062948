# SPDX-License-Identifier: Apache-2.0
"""The robustness matrix (losskit.testing.check_robustness) on seg_cross_entropy, both paths."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from losskit.testing import check_robustness
from losskit_segmentation import SegCrossEntropy


class _SameSize(SegCrossEntropy):
    """The criterion with an example whose logits already have the labels' size (no resizing)."""

    def example(self, batch_size: int = 2, *, device: Any = None, generator: Any = None) -> Any:
        out, target = super().example(batch_size, device=device, generator=generator)
        size = out["pred"].shape[-2:]
        target = {"target": target["target"][..., : size[0], : size[1]].contiguous()}
        return out, target


@pytest.mark.parametrize(
    "make",
    [
        SegCrossEntropy,
        lambda: SegCrossEntropy(class_weights=[1.0, 2.0, 0.5], label_smoothing=0.1, align_corners=True),
        _SameSize,
    ],
    ids=["defaults", "weights-smoothing", "same-size"],
)
def test_robustness_matrix(make: Any) -> None:
    report = check_robustness(make)
    assert report.failures == []
    assert report.runs["on"] > 10 and report.runs["off"] == report.runs["on"]


def test_same_size_example_really_skips_the_resize() -> None:
    out, target = _SameSize().example(2, generator=torch.Generator().manual_seed(0))
    assert out["pred"].shape[-2:] == target["target"].shape[-2:]
