# SPDX-License-Identifier: Apache-2.0
"""Entry-point discovery, the config file, defaults and the example batch."""

from __future__ import annotations

import importlib.metadata as md
import time
from pathlib import Path

import torch

import losskit
from losskit.schema import describe_fields
from losskit.testing import assert_defaults_match
from losskit_detection_yolov9 import YOLOv9Loss, YOLOv9LossConfig, yolov9_assign, yolov9_loss

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "detection-yolov9.yaml"


def test_discovered_through_the_entry_point() -> None:
    info = losskit.Registry().get("yolov9_loss")
    assert info.cls is YOLOv9Loss
    assert info.distribution == "losskit-detection-yolov9"
    assert info.plugin == "detection_yolov9"
    eps = {ep.name: ep.value for ep in md.entry_points(group="losskit")}
    assert eps["detection_yolov9"] == "losskit_detection_yolov9.plugin"


def test_config_file_builds_and_runs() -> None:
    loss = losskit.build_losses(CONFIG)
    crit = loss["yolov9_loss"]
    assert isinstance(crit, YOLOv9Loss) and crit.config.l1_activate_epoch is None
    out, target = crit.example(2, generator=torch.Generator().manual_seed(0))
    result = loss(out, target)
    assert set(result.parts) == {
        "yolov9_loss",
        "yolov9_loss/cls",
        "yolov9_loss/iou",
        "yolov9_loss/dfl",
        "total",
    }
    assert set(result.diagnostics) == {
        "yolov9_loss/num_fg",
        "yolov9_loss/cls_norm",
        "yolov9_loss/invalid_targets",
    }
    result.total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in out["pred"])


def test_defaults_are_netspresso_constants_and_live_in_the_config() -> None:
    c = YOLOv9Loss().config
    assert (c.reg_max, c.topk, c.iou_factor, c.cls_factor) == (16, 10, 6.0, 0.5)
    assert (c.cls_weight, c.dfl_weight, c.iou_weight) == (0.5, 1.5, 7.5)
    assert (c.assigner, c.aux_weight, c.cls_norm_min, c.num_classes) == ("netspresso", 0.0, 1.0, None)
    assert c.normalize_across_ranks is False and c.l1_activate_epoch is None
    fields = describe_fields(YOLOv9LossConfig)
    assert all(f.doc for f in fields)
    assert_defaults_match(yolov9_loss, YOLOv9LossConfig)
    assert_defaults_match(yolov9_assign, YOLOv9LossConfig)


def test_example_is_small_valid_and_seeded() -> None:
    crit = YOLOv9Loss()
    start = time.perf_counter()
    out, target = crit.example(3, generator=torch.Generator().manual_seed(1))
    terms = crit(out, target)
    sum(terms.values()).backward()
    assert time.perf_counter() - start < 2.0
    assert all(p.is_leaf and p.requires_grad for p in out["pred"])
    again, _ = crit.example(3, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(out["pred"], again["pred"]))
    assert len(target["gt"]) == 3 and float(terms.diagnostics["num_fg"]) > 0
    assert YOLOv9Loss(num_classes=7).example(1)[0]["pred"][0].shape[1] == 4 * 16 + 7
    aux_out, _ = YOLOv9Loss(aux_weight=0.25).example(2)
    assert set(aux_out["pred"]) == {"outputs", "aux_outputs"}
