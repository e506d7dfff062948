# SPDX-License-Identifier: Apache-2.0
"""Discovery through the entry point, the shipped config, NetsPresso's YAML block, defaults, the example."""

from __future__ import annotations

import dataclasses
import importlib.metadata
from pathlib import Path

import torch

import losskit
from losskit.schema import describe_fields
from losskit.testing import assert_defaults_match
from losskit_pose_rtmcc import RTMCCLoss, RTMCCLossConfig, rtmcc_loss, simcc_encode

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "pose-rtmcc.yaml"
NETSPRESSO_BLOCK = """\
model:
  losses:
    - criterion: rtmcc_loss
      weight: ~
"""


def test_discovered_through_the_entry_point() -> None:
    info = losskit.Registry().get("rtmcc_loss")
    assert info.cls is RTMCCLoss
    assert info.distribution == "losskit-pose-rtmcc"
    assert info.plugin == "pose_rtmcc"
    (ep,) = [e for e in importlib.metadata.entry_points(group="losskit") if e.name == "pose_rtmcc"]
    assert ep.value == "losskit_pose_rtmcc.plugin"


def test_shipped_config_builds_and_runs() -> None:
    loss = losskit.build_losses(CONFIG)
    crit = loss["rtmcc_loss"]
    assert isinstance(crit, RTMCCLoss) and crit.config == RTMCCLossConfig()
    out, target = crit.example(2, generator=torch.Generator().manual_seed(0))
    result = loss(out, target)
    assert set(result.parts) == {"rtmcc_loss", "rtmcc_loss/x", "rtmcc_loss/y", "total"}
    assert set(result.diagnostics) == {"rtmcc_loss/num_weighted"}
    result.total.backward()
    assert out["pred"].grad is not None and torch.isfinite(out["pred"].grad).all()
    assert float(out["pred"].grad.abs().sum()) > 0


def test_netspresso_block_loads_unchanged() -> None:
    cfg = losskit.load_config(NETSPRESSO_BLOCK)
    (entry,) = cfg.entries
    assert (entry.criterion, entry.weight, entry.config) == ("rtmcc_loss", 1.0, RTMCCLossConfig())


def test_defaults_are_netspresso_constants() -> None:
    c = RTMCCLoss().config
    assert (c.input_size, c.sigma, c.split_ratio, c.beta, c.label_softmax, c.label_beta) == (
        (256, 256),
        (5.66, 5.66),
        2.0,
        10.0,
        True,
        10.0,
    )
    assert (c.use_target_weight, c.normalize, c.visibility_weight, c.normalizer) == (
        True,
        False,
        "raw",
        "keypoints",
    )
    assert (c.mask, c.mask_weight, c.normalize_across_ranks) == (None, 1.0, False)
    fields = describe_fields(RTMCCLossConfig)
    assert [f.name for f in fields] == [f.name for f in dataclasses.fields(RTMCCLossConfig)]
    assert all(f.doc for f in fields)


def test_functional_defaults_are_the_config_defaults() -> None:
    assert_defaults_match(rtmcc_loss, RTMCCLossConfig)
    assert_defaults_match(simcc_encode, RTMCCLossConfig)


def test_example_is_small_valid_and_seeded() -> None:
    crit = RTMCCLoss()
    out, target = crit.example(3, generator=torch.Generator().manual_seed(1))
    again, again_t = crit.example(3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out["pred"], again["pred"]) and torch.equal(target["keypoints"], again_t["keypoints"])
    assert out["pred"].shape == (3, 17, 1024) and out["pred"].is_leaf and out["pred"].requires_grad
    terms = crit(out, target)
    assert 0 < float(terms.diagnostics["num_weighted"]) < 3 * 17
    assert RTMCCLoss(input_size=(192, 256)).example(1)[0]["pred"].shape == (1, 17, 384 + 512)


def test_config_errors_name_the_field() -> None:
    import pytest

    with pytest.raises(losskit.ConfigError, match=r"rtmcc_loss.split_ratio: .*0 bins"):
        RTMCCLoss(input_size=(1, 256), split_ratio=0.4)
    with pytest.raises(losskit.ConfigError, match=r"visibility_weight"):
        RTMCCLoss(visibility_weight="binarry")
    with pytest.raises(losskit.ConfigError, match=r"sigma"):
        RTMCCLoss(sigma=(0.0, 1.0))
    with pytest.raises(losskit.ConfigError, match=r"mask"):
        RTMCCLoss(mask=(-1,))
