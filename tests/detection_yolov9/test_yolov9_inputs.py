# SPDX-License-Identifier: Apache-2.0
"""Bad inputs and configs: typed errors that name the key; the caller's tensors are never modified."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from yolov9_cases import case

import losskit
from losskit import ConfigError, InputError
from losskit.checks import set_value_checks
from losskit_detection_yolov9 import YOLOv9Loss, yolov9_loss


def _batch(**kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    pred, gt, img = case([3, 2], **kwargs)
    return {"pred": pred}, {"gt": gt, "img_size": img}


def _raises(out: Any, target: Any, key: str, text: str, **config: Any) -> None:
    with pytest.raises(InputError) as info:
        YOLOv9Loss(**config)(out, target)
    message = str(info.value)
    assert key in message and text in message, message


def test_missing_and_malformed_outputs() -> None:
    out, target = _batch()
    _raises({}, target, "out['pred']", "missing")
    _raises({"pred": out["pred"][0]}, target, "out['pred']", "a tensor of shape (2, 67, 8, 8)")
    _raises({"pred": []}, target, "out['pred']", "empty list")
    _raises({"pred": [out["pred"][0][0]]}, target, "out['pred'][0]", "expected shape (B, 4 R + C, H, W)")
    _raises({"pred": [out["pred"][0].long()]}, target, "out['pred'][0]", "floating-point")
    _raises({"pred": [out["pred"][0], out["pred"][1][:1]]}, target, "out['pred'][1]", "batch size 1")
    _raises({"pred": {"aux_outputs": out["pred"]}}, target, "out['pred']['outputs']", "missing")


def test_channel_counts_that_do_not_fit_4r_plus_c() -> None:
    out, target = _batch()
    _raises(
        out, target, "out['pred'][0]", "expected 4 reg_max + num_classes = 68 channels, got 67", num_classes=4
    )
    _raises(out, target, "out['pred'][0]", "C >= 1", reg_max=17)
    _raises(out, {**target, "num_classes": 5}, "target['num_classes']", "does not match the 67 channels")
    mixed = {"pred": [out["pred"][0], out["pred"][1][:, :-1]]}
    _raises(mixed, target, "out['pred'][1]", "expected 67 channels as level 0")


def test_aux_branch_needed_and_checked_when_weighted() -> None:
    out, target = _batch()
    _raises(out, target, "out['pred']['aux_outputs']", "aux_weight > 0", aux_weight=0.25)
    levels = out["pred"]
    bad = {"pred": {"outputs": levels, "aux_outputs": [p[:, :-1] for p in levels]}}
    _raises(
        bad,
        target,
        "out['pred']['aux_outputs'][0]",
        "expected 67 channels like the main outputs",
        aux_weight=0.25,
    )
    grids = {"pred": {"outputs": levels, "aux_outputs": [*levels[:2], levels[1]]}}
    _raises(grids, target, "out['pred']['aux_outputs']", "same batch size and grids", aux_weight=0.25)


def test_targets_are_validated() -> None:
    out, target = _batch()
    _raises(out, {"gt": target["gt"]}, "target['img_size']", "missing")
    _raises(out, {**target, "img_size": 64.5}, "target['img_size']", "64.5")
    _raises(out, {**target, "img_size": (0, 64)}, "target['img_size']", "positive")
    _raises(out, {**target, "img_size": 4}, "out['pred'][0]", "exceeds the input width")
    _raises(out, {**target, "gt": target["gt"][:1]}, "target['gt']", "expected 2 entries")
    bad = copy.deepcopy(target)
    bad["gt"][1]["labels"][0] = 3
    _raises(out, bad, "target['gt'][1]['labels']", "class 3 is out of range; expected values in [0, 3)")
    bad = copy.deepcopy(target)
    bad["gt"][0]["boxes"][1, 2] = float("nan")
    _raises(out, bad, "target['gt'][0]['boxes']", "non-finite")
    bad = copy.deepcopy(target)
    bad["gt"][0]["boxes"][0, 2] = bad["gt"][0]["boxes"][0, 0] - 1
    _raises(out, bad, "target['gt'][0]['boxes']", "x2 >= x1")
    bad = copy.deepcopy(target)
    bad["gt"][0]["boxes"] = bad["gt"][0]["boxes"][:, :3]
    _raises(out, bad, "target['gt'][0]['boxes']", "(n, 4)")


def test_non_finite_predictions() -> None:
    out, target = _batch()
    levels = [p.detach().clone() for p in out["pred"]]
    levels[2][0, 5, 1, 1] = float("inf")
    _raises({"pred": levels}, target, "out['pred'][2]", "non-finite")


def test_with_value_checks_off_invalid_boxes_and_labels_are_left_out() -> None:
    out, target = _batch(seed=3)
    bad = copy.deepcopy(target)
    bad["gt"][0]["boxes"][0] = torch.tensor([30.0, 30.0, 10.0, 10.0])  # inverted
    bad["gt"][0]["labels"][1] = 7
    bad["gt"][1]["boxes"][0, 0] = float("nan")
    crit = YOLOv9Loss()
    set_value_checks("never")
    try:
        terms = crit(out, bad)
        assignment = crit.assign(out, bad)
    finally:
        set_value_checks(None)
    assert float(terms.diagnostics["invalid_targets"]) == 3.0
    assert all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in out["pred"])
    matched = assignment.matched_gt
    assert not ((matched[0] == 0) | (matched[0] == 1)).any() and not (matched[1] == 0).any()
    assert (matched[0] == 2).any()


def test_inputs_are_not_modified() -> None:
    out, target = _batch(seed=4)
    before = ([p.detach().clone() for p in out["pred"]], copy.deepcopy(target))
    crit = YOLOv9Loss(assigner="upstream")
    sum(crit(out, target).values()).backward()
    crit.assign(out, target)
    assert all(torch.equal(a, b) for a, b in zip(out["pred"], before[0]))
    for got, want in zip(target["gt"], before[1]["gt"]):
        assert torch.equal(got["boxes"], want["boxes"]) and torch.equal(got["labels"], want["labels"])


def test_bad_config_values() -> None:
    with pytest.raises(ConfigError, match="assigner"):
        YOLOv9Loss(assigner="simota")
    with pytest.raises(ConfigError, match="reg_max"):
        YOLOv9Loss(reg_max=1)
    with pytest.raises(ConfigError, match="cls_norm_min"):
        YOLOv9Loss(cls_norm_min=0.0)
    with pytest.raises(ConfigError, match="assigner"):
        yolov9_loss([], [], 64, assigner="other")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="l1_activate_epoch"):
        losskit.build_losses("losses: [{criterion: yolov9_loss, l1_activate_epoch: -1}]")
