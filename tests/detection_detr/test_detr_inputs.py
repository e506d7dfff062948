# SPDX-License-Identifier: Apache-2.0
"""Malformed inputs give located InputErrors; the caller's tensors are never modified; bad values
are left out of matching when value checks are off."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from detr_cases import case

import losskit
from losskit import InputError
from losskit_detection_detr import DetrLoss


def batch(**kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    return case(kw.pop("counts", (3, 2)), **kw)


def test_inverted_gt_box_names_image_and_box() -> None:
    out, target = batch()
    target["gt"][1]["boxes"][1, 2] = target["gt"][1]["boxes"][1, 0] - 1.0
    with pytest.raises(InputError, match=r"^detr_loss: target\['gt'\]\[1\]\['boxes'\]\[1\]: inverted box \["):
        DetrLoss()(out, target)


def test_bad_gt_values_name_the_entry() -> None:
    out, target = batch()
    target["gt"][0]["boxes"][2, 1] = float("nan")
    with pytest.raises(InputError, match=r"target\['gt'\]\[0\]\['boxes'\]\[2\]: non-finite box"):
        DetrLoss()(out, target)
    out, target = batch()
    target["gt"][1]["labels"][0] = 5  # C = 5
    with pytest.raises(
        InputError, match=r"target\['gt'\]\[1\]\['labels'\]\[0\]: class 5 is out of range; expected \[0, 5\)"
    ):
        DetrLoss()(out, target)


@pytest.mark.parametrize(("where", "key"), [("pred", "out['pred']"), ("aux", "out['aux_pred'][1]")])
def test_non_finite_predictions_name_the_set_and_image(where: str, key: str) -> None:
    out, target = batch()
    with torch.no_grad():
        if where == "pred":
            out["pred"][1, 4, 2] = float("nan")  # a box channel: it enters every cost of image 1
        else:
            out["aux_pred"][1]["pred_boxes"][1, 4, 0] = float("inf")
    with pytest.raises(InputError, match="contains non-finite values"):
        DetrLoss()(out, target)
    # with value checks off, the matcher finds them on the host, after its one transfer
    losskit.set_value_checks("never")
    try:
        with pytest.raises(InputError) as error:
            DetrLoss()(out, target)
    finally:
        losskit.set_value_checks(None)
    assert str(error.value).startswith(
        f"detr_loss: {key}: image 1: the matching cost contains non-finite values"
    )


def test_labels_needs_a_no_object_logit() -> None:
    out, target = batch()  # 5 logits
    target["num_classes"] = 5
    with pytest.raises(InputError) as error:
        DetrLoss(losses=["labels", "boxes"])(out, target)
    assert str(error.value).startswith(
        "detr_loss: out['pred']: 'labels' needs C + 1 = 6 class logits (the last is no-object) after the 4 box "
        "channels, got 5"
    )
    out, target = batch(classes=4, logits=5)
    with pytest.raises(
        InputError, match=r"target\['num_classes'\]: missing; 'labels' needs the number of classes"
    ):
        DetrLoss(losses=["labels"])(out, target)
    assert set(DetrLoss(losses=["labels"], num_classes=4)(out, target)) == {
        "labels",
        "aux_labels",
        "dn_labels",
    }


def test_num_classes_mismatch() -> None:
    out, target = batch()
    target["num_classes"] = 7
    with pytest.raises(InputError, match=r"out\['pred'\]: expected 4 \+ C = 11 channels \(C = 7\)"):
        DetrLoss()(out, target)


def test_structure_errors() -> None:
    crit = DetrLoss()
    out, target = batch()
    with pytest.raises(InputError, match=r"out\['pred'\]: missing; out has keys"):
        crit({"aux_pred": out["aux_pred"]}, target)
    with pytest.raises(InputError, match=r"out\['pred'\]: expected shape \(B, Q, 4 \+ C\) with C >= 1"):
        crit({"pred": out["pred"][..., :4]}, target)
    bad = {**out, "aux_pred": [{"pred_logits": out["aux_pred"][0]["pred_logits"]}]}
    with pytest.raises(
        InputError, match=r"out\['aux_pred'\]\[0\]: expected a dict with 'pred_logits', 'pred_boxes'"
    ):
        crit(bad, target)
    bad = {**out, "aux_pred": [{"pred_logits": torch.zeros(2, 30, 4), "pred_boxes": torch.zeros(2, 30, 4)}]}
    with pytest.raises(
        InputError, match=r"out\['aux_pred'\]\[0\]\['pred_logits'\]: expected shape \(2, 30, 5\)"
    ):
        crit(bad, target)
    with pytest.raises(InputError, match=r"out\['dn_meta'\]: expected a dict"):
        crit({**out, "dn_meta": None}, target)
    meta = {**out["dn_meta"], "dn_positive_idx": out["dn_meta"]["dn_positive_idx"][:1]}
    with pytest.raises(InputError, match=r"dn_positive_idx'\]: expected a tuple of 2 int64 tensors"):
        crit({**out, "dn_meta": meta}, target)
    meta = {
        **out["dn_meta"],
        "dn_positive_idx": (out["dn_meta"]["dn_positive_idx"][0][:-1], out["dn_meta"]["dn_positive_idx"][1]),
    }
    with pytest.raises(
        InputError,
        match=r"dn_positive_idx'\]\[0\]: expected 12 entries \(dn_num_group 4 x 3 gts of image 0\), got 11",
    ):
        crit({**out, "dn_meta": meta}, target)
    with pytest.raises(InputError, match=r"target\['img_size'\]: expected an int or \(H, W\)"):
        crit(out, {**target, "img_size": "640"})
    with pytest.raises(InputError, match=r"target\['gt'\]: expected 2 entries"):
        crit(out, {**target, "gt": target["gt"][:1]})


def test_device_mismatch_names_both() -> None:
    out, target = batch()
    target["gt"][0]["boxes"] = target["gt"][0]["boxes"].to("meta")
    with pytest.raises(
        InputError, match=r"target\['gt'\]\[0\]\['boxes'\]: is on meta but out\['pred'\] is on cpu"
    ):
        DetrLoss()(out, target)


def test_target_and_outputs_are_not_modified_and_a_second_call_agrees() -> None:
    out, target = batch(counts=(4, 0, 2))
    before = copy.deepcopy(target)
    snapshot = [t.detach().clone() for t in (out["pred"], out["aux_pred"][0]["pred_boxes"])]
    crit = DetrLoss()
    first = crit(out, target)
    second = crit(out, target)  # NetsPresso normalises target["gt"] in place: 15.8, then 61.3
    for k in first:
        assert torch.equal(first[k], second[k])
    for a, b in zip(target["gt"], before["gt"]):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
    assert torch.equal(out["pred"], snapshot[0]) and torch.equal(
        out["aux_pred"][0]["pred_boxes"], snapshot[1]
    )


def test_invalid_targets_are_left_out_when_value_checks_are_off() -> None:
    out, target = batch(counts=(4, 3))
    bad = copy.deepcopy(target)
    bad["gt"][0]["boxes"][1, 2] = bad["gt"][0]["boxes"][1, 0] - 5.0  # inverted
    bad["gt"][1]["labels"][2] = 99  # out of range
    keep = copy.deepcopy(target)
    for i, j in ((0, 1), (1, 2)):
        rows = [r for r in range(len(keep["gt"][i]["labels"])) if r != j]
        keep["gt"][i] = {k: v[rows] for k, v in keep["gt"][i].items()}
    out_no_dn = {**out, "dn_aux_pred": None, "dn_meta": None}
    crit = DetrLoss()
    losskit.set_value_checks("never")
    try:
        got = crit(out_no_dn, bad)
    finally:
        losskit.set_value_checks(None)
    want = crit(out_no_dn, keep)
    assert (
        float(got.diagnostics["invalid_targets"]) == 2.0 and float(want.diagnostics["invalid_targets"]) == 0
    )
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)


def test_no_gt_and_no_dn_keeps_every_key_and_the_graph() -> None:
    out, target = batch(counts=(0, 0), dn=False)
    assert out["dn_meta"] is None
    terms = DetrLoss()(out, target)
    assert tuple(terms) == DetrLoss.terms
    for k in ("dn_vfl", "dn_bbox", "dn_giou", "bbox", "giou", "aux_bbox"):
        assert float(terms[k]) == 0.0 and terms[k].requires_grad
    assert float(terms["vfl"]) > 0  # every query is a negative
    sum(terms.values()).backward()
    assert out["pred"].grad is not None and torch.isfinite(out["pred"].grad).all()


def test_empty_batch() -> None:
    out, target = batch(counts=(), dn=False)
    terms = DetrLoss()(out, target)
    assert all(float(v) == 0.0 for v in terms.values())
    sum(terms.values()).backward()
