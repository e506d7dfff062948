# SPDX-License-Identifier: Apache-2.0
"""Discovery through the installed entry point, the shipped config, the example batch, missing plugins."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch

import losskit
from losskit_segmentation_pidnet import PIDNetLoss

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "segmentation-pidnet.yaml"
DIST = "losskit-segmentation-pidnet"


def test_discovered_through_entry_point():
    info = losskit.Registry().get("pidnet_loss")
    assert info.cls is PIDNetLoss
    assert info.distribution == DIST
    assert info.plugin == "pidnet"
    (ep,) = [e for e in importlib.metadata.entry_points(group="losskit") if e.name == "pidnet"]
    assert ep.value == "losskit_segmentation_pidnet.plugin"


def test_shipped_config_builds_and_runs():
    loss = losskit.build_losses(CONFIG)
    crit = loss["pidnet_loss"]
    assert crit.config.ohem and crit.config.ohem_min_kept == 131072 and crit.config.ignore_index == 255
    out, target = crit.example(2, generator=torch.Generator().manual_seed(0))
    result = loss(out, target)
    assert torch.isfinite(result.total)
    assert set(result.parts) == {
        "pidnet_loss",
        "pidnet_loss/ce",
        "pidnet_loss/boundary",
        "pidnet_loss/boundary_ce",
        "total",
    }
    assert set(result.diagnostics) == {f"pidnet_loss/{k}" for k in PIDNetLoss.diagnostics}
    result.total.backward()
    assert all(torch.isfinite(v.grad).all() for v in out.values())


def test_defaults_are_the_reference_values():
    c = PIDNetLoss().config
    assert (
        c.ignore_index,
        c.balance_weights,
        c.boundary_weight,
        c.boundary_ce_weight,
        c.boundary_threshold,
    ) == (
        255,
        (0.4, 1.0),
        20.0,
        1.0,
        0.8,
    )
    assert (c.class_weights, c.align_corners, c.ohem, c.ohem_thresh, c.ohem_min_kept) == (
        None,
        True,
        False,
        0.9,
        131072,
    )
    assert c.normalize_across_ranks is False


def test_example_is_small_valid_and_seeded():
    crit = PIDNetLoss()
    a = crit.example(3, generator=torch.Generator().manual_seed(1))
    b = crit.example(3, generator=torch.Generator().manual_seed(1))
    for side_a, side_b in zip(a, b):
        for k in side_a:
            assert torch.equal(side_a[k], side_b[k])
    out, target = a
    assert all(v.is_leaf and v.requires_grad for v in out.values())
    assert (target["target"] == 255).any() and target["bd_gt"].sum() > 0
    terms = crit(out, target)
    assert all(torch.isfinite(v) for v in terms.values())
    weighted = PIDNetLoss(class_weights=[1.0, 2.0, 1.0])
    out, target = weighted.example(2)
    assert out["pred"].shape[1] == 3
    weighted(out, target)


def test_class_weights_buffer_follows_the_module():
    crit = PIDNetLoss(class_weights=[1.0, 2.0, 3.0, 4.0])
    assert crit.class_weights is not None and crit.class_weights.tolist() == [1.0, 2.0, 3.0, 4.0]
    assert "class_weights" not in crit.state_dict()  # not persistent: the config is the source of truth
