# SPDX-License-Identifier: Apache-2.0
"""The example third-party plugin (the one docs/writing-a-plugin.md shows) behaves as the guide says."""

from __future__ import annotations

import math

import pytest
import torch

import losskit
from losskit_charbonnier import CharbonnierLoss, charbonnier_loss


def test_reductions_by_hand() -> None:
    pred, target = torch.tensor([0.0, 3.0]), torch.tensor([0.0, -1.0])
    eps = 1e-3  # elementwise sqrt(d^2 + eps^2) for d = 0 and 4
    values = [eps, math.sqrt(16.0 + eps * eps)]
    assert float(charbonnier_loss(pred, target, eps, "sum")) == pytest.approx(sum(values), rel=1e-6)
    assert float(charbonnier_loss(pred, target, eps, "mean")) == pytest.approx(sum(values) / 2, rel=1e-6)


@pytest.mark.parametrize("bad", ["meen", "none", "", None])
def test_functional_rejects_an_unknown_reduction(bad: object) -> None:
    with pytest.raises(losskit.ConfigError) as error:
        charbonnier_loss(torch.zeros(2), torch.zeros(2), 1e-3, bad)  # type: ignore[arg-type]
    assert isinstance(error.value, ValueError)
    assert str(error.value) == f"charbonnier_loss: reduction must be 'mean' or 'sum', got {bad!r}"


def test_config_rejects_an_unknown_reduction() -> None:
    with pytest.raises(losskit.ConfigError, match=r"charbonnier_loss\.reduction: .*'meen'.*'mean', 'sum'"):
        CharbonnierLoss(reduction="meen")
