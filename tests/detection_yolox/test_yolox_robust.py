# SPDX-License-Identifier: Apache-2.0
"""Finite in, finite out (issue 18): the robustness matrix, invalid ground truths left out of matching
and counted, far-away boxes, devices, integral scalars for img_size and set_epoch, config defaults."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from yolox_cases import fresh, make_batch

import losskit
from losskit.testing import assert_defaults_match, check_robustness
from losskit_detection_yolox import YOLOXLoss, YOLOXLossConfig, yolox_assign, yolox_loss


@pytest.fixture
def checks_off():
    losskit.set_value_checks("never")
    try:
        yield
    finally:
        losskit.set_value_checks(None)


def test_robustness_matrix() -> None:
    report = check_robustness(YOLOXLoss)
    for mode in ("on", "off"):
        assert report.runs[mode] == report.typed_errors[mode] + report.results[mode] > 50


def test_functional_defaults_come_from_the_config() -> None:
    assert_defaults_match(yolox_loss, YOLOXLossConfig)
    assert_defaults_match(yolox_assign, YOLOXLossConfig)
    assert YOLOXLoss.Config is YOLOXLossConfig


def _with_bad_rows(target, bad):
    """``target`` with one extra ground truth per image, made invalid by ``bad(boxes, labels)``."""
    gt = []
    for item in target["gt"]:
        boxes = torch.cat((item["boxes"], torch.tensor([[10.0, 20.0, 50.0, 60.0]])))
        labels = torch.cat((item["labels"], torch.tensor([1])))
        bad(boxes, labels)
        gt.append({"boxes": boxes, "labels": labels})
    return {**target, "gt": gt}


def _set(where, index, value):
    def edit(boxes, labels):
        (labels if where == "labels" else boxes)[index] = value

    return edit


BAD_ROWS = {
    "label C": _set("labels", -1, 5),
    "label -1": _set("labels", -1, -1),
    "inverted x": _set("boxes", (-1, 2), 5.0),
    "inverted y": _set("boxes", (-1, 3), 0.0),
    "nan box": _set("boxes", (-1, 0), float("nan")),
    "inf box": _set("boxes", (-1, 2), float("inf")),
}


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_invalid_ground_truths_are_left_out_and_counted(kind, checks_off) -> None:
    out, target = make_batch(3, num_classes=5, counts=(3, 2))
    crit = YOLOXLoss()
    crit.set_epoch(1)
    clean = crit(fresh(out), target)
    bad = _with_bad_rows(target, BAD_ROWS[kind])
    got_out = fresh(out)
    got = crit(got_out, bad)
    got.total.backward()
    assert all(torch.isfinite(p.grad).all() for p in got_out["pred"])
    for name in clean:
        torch.testing.assert_close(got[name], clean[name], rtol=1e-6, atol=0)
    assert got.diagnostics["num_fg"] == clean.diagnostics["num_fg"]
    assert got.diagnostics["invalid_targets"].item() == 2.0 and clean.diagnostics["invalid_targets"] == 0
    a, a_clean = crit.assign(out, bad), crit.assign(out, target)
    assert torch.equal(a.fg_mask, a_clean.fg_mask) and torch.equal(a.matched_gt, a_clean.matched_gt)
    assert (a.dynamic_k[:, -1] == 0).all()  # the invalid rows selected nothing


@pytest.mark.parametrize("kind", ["label C", "label -1", "inverted x", "nan box"])
def test_invalid_ground_truths_raise_with_value_checks_on(kind) -> None:
    out, target = make_batch(3, num_classes=5, counts=(3, 2))
    with pytest.raises(losskit.InputError, match=r"target\['gt'\]\[0\]\['(labels|boxes)'\]"):
        YOLOXLoss()(out, _with_bad_rows(target, BAD_ROWS[kind]))


def test_only_invalid_ground_truths_is_an_empty_batch(checks_off) -> None:
    out, _ = make_batch(4, num_classes=5, counts=(0, 0))
    labels = torch.tensor([7, -3])
    target = {"gt": [{"boxes": torch.tensor([[0.0, 0, 8, 8], [4.0, 4, 12, 12]]), "labels": labels}] * 2}
    terms = YOLOXLoss()(out, {**target, "img_size": 128})
    empty = YOLOXLoss()(
        fresh(out), {"gt": [{"boxes": torch.zeros(0, 4), "labels": labels[:0]}] * 2, "img_size": 128}
    )
    for name in terms:
        torch.testing.assert_close(terms[name], empty[name], rtol=0, atol=0)
    assert terms.diagnostics["invalid_targets"].item() == 4.0 and terms.diagnostics["num_fg"] == 0


@pytest.mark.parametrize("iou_loss", ["iou", "giou"])
@pytest.mark.parametrize("mode", ["always", "never"])
def test_far_away_box_centres_stay_finite(iou_loss, mode) -> None:
    # box-centre outputs of 1e19 (decoded ~1e20 px away): finite inputs, finite loss and gradients
    out, target = make_batch(5, num_classes=5, counts=(3, 2), informed=1.0)
    with torch.no_grad():
        for p in out["pred"]:
            p[:, 0:2] = 1e19
    crit = YOLOXLoss(iou_loss=iou_loss)
    crit.set_epoch(1)
    losskit.set_value_checks(mode)
    try:
        terms = crit(out, target)
    finally:
        losskit.set_value_checks(None)
    terms.total.backward()
    assert all(torch.isfinite(v) for v in terms.values())
    assert all(torch.isfinite(p.grad).all() for p in out["pred"])


def test_targets_on_another_device_name_both_keys_and_devices() -> None:
    out, target = make_batch(6, counts=(2, 1))
    target["gt"][1] = {k: v.to("meta") for k, v in target["gt"][1].items()}
    with pytest.raises(losskit.InputError) as info:
        YOLOXLoss()(out, target)
    msg = str(info.value)
    assert "target['gt'][1]['boxes']" in msg and "meta" in msg and "out['pred'][0]" in msg and "cpu" in msg


@pytest.mark.parametrize(
    "img_size",
    [
        np.int64(128),
        torch.tensor(128),
        np.float32(128.0),
        (np.int32(128), torch.tensor(128)),
        torch.tensor([128, 128]),
    ],
    ids=["numpy-int", "0d-tensor", "numpy-float", "pair-of-scalars", "tensor-pair"],
)
def test_img_size_takes_any_real_scalar(img_size) -> None:
    out, target = make_batch(7, counts=(2, 3))
    ref = YOLOXLoss()(out, target)
    got = YOLOXLoss()(fresh(out), {**target, "img_size": img_size})
    for name in ref:
        assert torch.equal(got[name], ref[name])


def test_set_epoch_takes_a_numpy_integer() -> None:
    crit = YOLOXLoss(l1_activate_epoch=3)
    crit.set_epoch(np.int64(3))
    assert crit.l1_active and crit.epoch == 3
