# SPDX-License-Identifier: Apache-2.0
"""yolofastest_loss through the robustness matrix (finite in, finite out; typed errors), and invalid
ground truths left out of matching and counted, as for yolox_loss (the same shared code)."""

from __future__ import annotations

import pytest
import torch
from yolofastest_cases import V2_ANCHORS, fresh, make_batch

import losskit
from losskit.testing import check_robustness
from losskit_detection_yolox import YOLOFastestLoss


def test_robustness_matrix() -> None:
    report = check_robustness(lambda: YOLOFastestLoss(anchors=V2_ANCHORS))
    for mode in ("on", "off"):
        assert report.runs[mode] == report.typed_errors[mode] + report.results[mode] > 50


@pytest.mark.parametrize("kind", ["label C", "label -1", "inverted", "nan box"])
def test_invalid_ground_truths_are_left_out_and_counted(kind: str) -> None:
    out, target = make_batch(3, batch=2, num_classes=5, img=128, counts=[3, 2], informed=1.0)
    crit = YOLOFastestLoss(anchors=V2_ANCHORS)
    clean = crit(fresh(out), target)
    gt = []
    for item in target["gt"]:
        boxes = torch.cat((item["boxes"], torch.tensor([[10.0, 20.0, 50.0, 60.0]])))
        labels = torch.cat((item["labels"], torch.tensor([1])))
        if kind.startswith("label"):
            labels[-1] = 5 if kind == "label C" else -1
        else:
            boxes[-1, 2] = 5.0 if kind == "inverted" else float("nan")
        gt.append({"boxes": boxes, "labels": labels})
    losskit.set_value_checks("never")
    try:
        got_out = fresh(out)
        got = crit(got_out, {**target, "gt": gt})
    finally:
        losskit.set_value_checks(None)
    sum(got.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in got_out["pred"])
    for name in clean:
        torch.testing.assert_close(got[name], clean[name], rtol=1e-6, atol=0)
    assert (
        float(got.diagnostics["invalid_targets"]) == 2.0 and float(clean.diagnostics["invalid_targets"]) == 0
    )
    with pytest.raises(losskit.InputError, match=r"yolofastest_loss: target\['gt'\]\[0\]"):
        crit(fresh(out), {**target, "gt": gt})  # value checks on (CPU): a named error instead
