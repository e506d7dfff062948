# SPDX-License-Identifier: Apache-2.0
"""Finite in, finite out (issue 18): the robustness matrix, device mismatches named, config defaults."""

from __future__ import annotations

import pytest
import torch

import losskit
from losskit.testing import assert_defaults_match, check_robustness
from losskit_segmentation_pidnet import PIDNetLoss, PIDNetLossConfig, pidnet_loss


@pytest.mark.parametrize(
    "fields", [{}, {"ohem": True, "ohem_min_kept": 50, "class_weights": [1.0, 2.0, 0.5, 1.0]}]
)
def test_robustness_matrix(fields) -> None:
    report = check_robustness(lambda: PIDNetLoss(**fields))
    for mode in ("on", "off"):
        assert report.runs[mode] == report.typed_errors[mode] + report.results[mode] > 40


def test_functional_defaults_come_from_the_config() -> None:
    assert_defaults_match(pidnet_loss, PIDNetLossConfig)
    assert PIDNetLoss.Config is PIDNetLossConfig


@pytest.mark.parametrize("key", ["out['extra_p']", "out['extra_d']", "target['target']", "target['bd_gt']"])
@pytest.mark.parametrize("mode", ["always", "never"])
def test_device_mismatch_names_both_keys_and_devices(key, mode) -> None:
    crit = PIDNetLoss()
    out, target = crit.example(generator=torch.Generator().manual_seed(0))
    side, name = key.split("[")[0], key.split("'")[1]
    (out if side == "out" else target)[name] = (out if side == "out" else target)[name].detach().to("meta")
    losskit.set_value_checks(mode)
    try:
        with pytest.raises(losskit.InputError) as info:
            crit(out, target)
    finally:
        losskit.set_value_checks(None)
    msg = str(info.value)
    assert msg.startswith(f"pidnet_loss: {key}: is on meta") and "out['pred'] is on cpu" in msg, msg
