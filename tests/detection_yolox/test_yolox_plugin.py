# SPDX-License-Identifier: Apache-2.0
"""Entry-point discovery, the config file, defaults, the example batch and absent sibling plugins."""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import time
from pathlib import Path

import torch

import losskit
from losskit.schema import describe_fields
from losskit_detection_yolox import YOLOXLoss

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "detection-yolox.yaml"


def test_discovered_through_the_entry_point() -> None:
    info = losskit.Registry().get("yolox_loss")
    assert info.cls is YOLOXLoss
    assert info.distribution == "losskit-detection-yolox"
    assert info.plugin == "yolox"
    eps = {ep.name: ep.value for ep in md.entry_points(group="losskit")}
    assert eps["yolox"] == "losskit_detection_yolox.plugin"


def test_config_file_builds_and_runs() -> None:
    loss = losskit.build_losses(CONFIG)
    crit = loss["yolox_loss"]
    assert isinstance(crit, YOLOXLoss) and crit.config.l1_activate_epoch == 285
    out, target = crit.example(2, generator=torch.Generator().manual_seed(0))
    result = loss(out, target)
    assert set(result.parts) == {
        "yolox_loss",
        "yolox_loss/iou",
        "yolox_loss/obj",
        "yolox_loss/cls",
        "yolox_loss/l1",
        "total",
    }
    assert set(result.diagnostics) == {
        "yolox_loss/num_fg",
        "yolox_loss/l1_active",
        "yolox_loss/invalid_targets",
    }
    assert float(result.parts["yolox_loss/l1"]) == 0.0
    result.total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in out["pred"])
    loss.set_epoch(285)
    assert float(loss(out, target).parts["yolox_loss/l1"]) > 0.0


def test_defaults_are_yolox_constants() -> None:
    config = YOLOXLoss().config
    assert (config.reg_weight, config.center_radius, config.candidate_topk, config.iou_cost_weight) == (
        5.0,
        1.5,
        10,
        3.0,
    )
    assert config.iou_loss == "iou" and config.normalize_across_ranks is False
    assert config.l1_activate_epoch == 1 and config.num_classes is None and config.strides is None
    fields = describe_fields(YOLOXLoss.Config)
    assert [f.name for f in fields] == [f.name for f in dataclasses.fields(YOLOXLoss.Config)]
    assert all(f.doc for f in fields)


def test_example_is_small_valid_and_seeded() -> None:
    crit = YOLOXLoss()
    start = time.perf_counter()
    out, target = crit.example(3, generator=torch.Generator().manual_seed(1))
    terms = crit(out, target)
    terms.total.backward()
    assert time.perf_counter() - start < 1.0
    assert all(p.is_leaf and p.requires_grad for p in out["pred"])
    again, _ = crit.example(3, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(out["pred"], again["pred"]))
    assert len(target["gt"]) == 3 and float(terms.diagnostics["num_fg"]) > 0
    assert YOLOXLoss(num_classes=7).example(1)[0]["pred"][0].shape[1] == 12
