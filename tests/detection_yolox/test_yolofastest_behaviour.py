# SPDX-License-Identifier: Apache-2.0
"""yolofastest_loss: hand-checkable cases, the decode, the public assignment, empty batches, fixed keys,
the entry point, the config file, defaults and the example batch."""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from yolofastest_cases import V2_ANCHORS, fresh, make_batch

import losskit
from losskit.schema import describe_fields
from losskit.testing import assert_defaults_match
from losskit_detection_yolox import (
    YOLOFastestLoss,
    YOLOFastestLossConfig,
    YOLOXLoss,
    yolofastest_assign,
    yolofastest_loss,
)
from losskit_detection_yolox.yolofastest import _decode_anchors

LOG2 = math.log(2.0)
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "detection-yolofastest.yaml"
#: one level of 4x4 cells (stride 8 on a 32x32 input), two anchors per cell: 8x8 and 16x4 pixels
ANCHORS = ((8.0, 8.0, 16.0, 4.0),)


def one_level(num_classes: int = 2) -> torch.Tensor:
    """Every anchor predicts a box of its own size centred on its cell, logits 0."""
    return torch.zeros(1, 2, 5 + num_classes, 4, 4)


def run(p: torch.Tensor, boxes: list[list[float]], labels: list[int], **fields):
    crit = YOLOFastestLoss(anchors=fields.pop("anchors", ANCHORS), **fields)
    out = {"pred": [p.clone().requires_grad_(True)]}
    target = {"gt": [{"boxes": torch.tensor(boxes), "labels": torch.tensor(labels)}], "img_size": 32}
    return crit(out, target), crit.assign(out, target), out


def test_decode_by_hand_and_as_netspresso_writes_it() -> None:
    # anchor 1 (16 x 4) of cell (x=2, y=1), stride 8: t = 0 gives the anchor's size at the cell centre
    reg = torch.zeros(1, 4, 1)
    a = 16 + 1 * 4 + 2  # level offset 0, anchor 1 -> 16 cells, row 1 -> 4, column 2
    grid = _grid()
    box = _decode_anchors(reg, grid, torch.tensor([[a]]))[0, 0]
    assert box.tolist() == [(0.5 + 2) * 8, (0.5 + 1) * 8, 16.0, 4.0]
    t = torch.linspace(-12, 12, 101, dtype=torch.float64)
    ours = 4 * torch.sigmoid(t - math.log(3.0))
    netspresso = 2 * (torch.tanh(t / 2 - math.atanh(0.5)) + 1)
    torch.testing.assert_close(ours, netspresso, rtol=1e-12, atol=1e-15)
    big = _decode_anchors(torch.full((1, 4, 1), 80.0), grid, torch.tensor([[a]]))[0, 0]
    assert big[2:].tolist() == [64.0, 16.0]  # saturates at 4x the anchor; never overflows


def _grid():
    from losskit_detection_yolox._assign import AnchorGrid

    return AnchorGrid.build([(4, 4)], [(8.0, 8.0)], torch.device("cpu"), anchor_sizes=[[(8, 8), (16, 4)]])


def test_one_box_matched_by_the_anchor_of_its_size() -> None:
    # box (8, 8, 16, 16): centre (12, 12) = cell (1, 1)'s centre; the 8x8 anchor of that cell predicts it
    # exactly (IoU 1); the 16x4 anchor there has IoU 32 / 96 = 1/3; sum of the top-10 IoUs is < 2: k = 1
    terms, a, _ = run(one_level(), [[8, 8, 16, 16]], [1])
    assert a.fg_mask.shape == (1, 32)
    assert a.fg_mask[0].nonzero().flatten().tolist() == [5]  # anchor 0, row 1, column 1
    assert a.matched_gt[0, 5] == 0 and a.matched_iou[0, 5] == 1.0
    assert a.dynamic_k.tolist() == [[1]]
    assert terms.diagnostics["num_fg"] == 1
    assert float(terms["iou"]) == pytest.approx(0.0, abs=1e-6)  # 5 * (1 - GIoU 1)
    assert float(terms["obj"]) == pytest.approx(32 * LOG2, rel=1e-6)  # 32 anchors, logit 0
    assert float(terms["cls"]) == pytest.approx(2 * LOG2, rel=1e-6)  # 2 classes, logit 0


def test_the_other_anchor_wins_when_it_fits_better() -> None:
    # a 16 x 4 box centred on cell (1, 1); radius 0.5 keeps that cell's two anchors as the only
    # candidates: anchor 1 (16 x 4, index 16 + 5) has IoU 1, anchor 0 (8 x 8) IoU 32 / 96, so k = 1
    box = [[4.0, 10.0, 20.0, 14.0]]
    terms, a, _ = run(one_level(), box, [0], center_radius=0.5)
    assert a.fg_mask[0].nonzero().flatten().tolist() == [21] and a.dynamic_k.tolist() == [[1]]
    # with the default radius 1.5 the top IoUs sum to 1 + 3 / 3 + 2 / 7 (neighbours), so k = 2
    _, wide, _ = run(one_level(), box, [0])
    assert wide.dynamic_k.tolist() == [[2]] and bool(wide.fg_mask[0, 21])
    # GIoU term by hand after moving the prediction: tx = logit(0.25) puts cx at (0.25 + 1) * 8 = 10
    p = one_level()
    p[0, 1, 0, 1, 1] = math.log(0.25 / 0.75)
    terms, a, _ = run(p, box, [0], center_radius=0.5)
    assert a.fg_mask[0].nonzero().flatten().tolist() == [21]
    iou = (14 * 4) / (2 * 64 - 56)  # boxes (2, 10, 18, 14) and (4, 10, 20, 14): hull = union
    assert float(a.matched_iou[0, 21]) == pytest.approx(iou, rel=1e-6)
    assert float(terms["iou"]) == pytest.approx(5.0 * (1 - iou), rel=1e-5)
    iou_sq, _, _ = run(p, box, [0], center_radius=0.5, iou_loss="iou")
    assert float(iou_sq["iou"]) == pytest.approx(5.0 * (1 - iou**2), rel=1e-5)
    # the class target is onehot * IoU: BCE(0, iou) = log 2 for either target value
    assert float(terms["cls"]) == pytest.approx(2 * LOG2, rel=1e-6)


def test_two_anchors_of_one_cell_can_both_be_foreground() -> None:
    # an 8 x 8 box on cell (1, 1): anchor 0 predicts it with t = 0; anchor 1 (16 x 4) is made to predict
    # it too, w = 4 sigmoid(tw - ln 3) 16 = 8 and h = 4 sigmoid(th - ln 3) 4 = 8. Both have IoU 1, the
    # other 16 candidates (2 anchors x 8 neighbouring cells) overlap less; k = int(2 + ...) >= 2
    p = one_level()
    p[0, 1, 2, 1, 1] = math.log(3.0) + math.log(1 / 7)  # sigmoid(x - ln 3) = 1/8
    p[0, 1, 3, 1, 1] = math.log(3.0)  # sigmoid(-0) = 1/2
    _, a, _ = run(p, [[8, 8, 16, 16]], [0])
    fg = a.fg_mask[0].nonzero().flatten().tolist()
    assert 5 in fg and 21 in fg and int(a.dynamic_k[0, 0]) >= 2
    assert float(a.matched_iou[0, 5]) == 1.0
    assert float(a.matched_iou[0, 21]) == pytest.approx(1.0, rel=1e-6)
    prior = {r * 4 + c for r in range(3) for c in range(3)}
    assert all(i % 16 in prior for i in fg)  # foreground only at the prior cells, of either anchor


def test_zero_batch_and_empty_images() -> None:
    pred = [torch.zeros(0, 3, 8, s, s, requires_grad=True) for s in (4, 2)]
    terms = yolofastest_loss(pred, [], 64, anchors=V2_ANCHORS)
    assert tuple(terms) == ("iou", "obj", "cls") and all(float(t) == 0.0 for t in terms.values())
    terms["obj"].backward()
    assert yolofastest_assign(pred, [], 64, anchors=V2_ANCHORS).fg_mask.shape == (0, 60)

    out, target = make_batch(0, batch=3, num_classes=4, img=64, counts=[0, 0, 0])
    terms = YOLOFastestLoss(anchors=V2_ANCHORS)(out, target)
    assert float(terms["iou"]) == float(terms["cls"]) == 0.0 and terms.diagnostics["num_fg"] == 0
    obj = torch.cat([p.detach()[:, :, 4].flatten(1) for p in out["pred"]], 1)
    expected = F.binary_cross_entropy_with_logits(obj, torch.zeros_like(obj), reduction="sum")
    assert float(terms["obj"]) == pytest.approx(float(expected), rel=1e-6)
    sum(terms.values()).backward()
    for p in out["pred"]:
        assert (
            (p.grad[:, :, 4] != 0).all() and (p.grad[:, :, :4] == 0).all() and (p.grad[:, :, 5:] == 0).all()
        )


@pytest.mark.parametrize("counts", [[0, 0], [0, 30], [1, 0]])
def test_term_and_diagnostic_keys_never_change(counts: list[int]) -> None:
    out, target = make_batch(2, batch=2, num_classes=3, img=128, counts=counts)
    crit = YOLOFastestLoss(anchors=V2_ANCHORS, l1_activate_epoch=0)
    crit.set_epoch(5)  # l1_activate_epoch has no effect
    terms = crit(out, target)
    assert tuple(terms) == crit.term_names() == ("iou", "obj", "cls")
    assert tuple(terms.diagnostics) == crit.diagnostic_names() == ("num_fg", "invalid_targets")
    assert all(t.dim() == 0 and t.dtype == torch.float32 and t.requires_grad for t in terms.values())


def test_assignment_has_yolox_fields_and_invariants() -> None:
    out, target = make_batch(3, batch=3, num_classes=5, img=192, gts=(0, 30), kind="mixed", informed=0.8)
    crit = YOLOFastestLoss(anchors=V2_ANCHORS)
    a = crit.assign(out, target)
    yolox_fields = {f.name for f in dataclasses.fields(YOLOXLoss().assign(*_yolox_batch()))}
    assert {f.name for f in dataclasses.fields(a)} == yolox_fields
    assert a.fg_mask.shape == (3, 3 * (12 * 12 + 6 * 6))
    assert torch.equal(a.fg_mask, a.matched_gt >= 0)
    assert ((a.matched_iou >= 0) & (a.matched_iou <= 1)).all() and (a.matched_iou[~a.fg_mask] == 0).all()
    for i, item in enumerate(target["gt"]):
        n = len(item["labels"])
        assert int(a.fg_mask[i].sum()) <= int(a.dynamic_k[i, :n].sum())
        assert (a.dynamic_k[i, n:] == 0).all()
    assert float(crit(out, target).diagnostics["num_fg"]) == float(a.fg_mask.sum())


def _yolox_batch():
    gen = torch.Generator().manual_seed(0)
    pred = [torch.randn(1, 8, 4, 4, generator=gen)]
    return {"pred": pred}, {
        "gt": [{"boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0]]), "labels": torch.tensor([1])}],
        "img_size": 32,
    }


def test_boxes_are_not_mutated_and_static_slots_agree() -> None:
    out, target = make_batch(8, batch=3, num_classes=5, img=192, gts=(0, 30), kind="mixed", informed=0.8)
    before = [g["boxes"].clone() for g in target["gt"]]
    exact = YOLOFastestLoss(anchors=V2_ANCHORS, candidate_slots="exact")
    static = YOLOFastestLoss(anchors=V2_ANCHORS, candidate_slots="static")
    ea, sa = exact.assign(out, target), static.assign(out, target)
    assert torch.equal(ea.fg_mask, sa.fg_mask) and torch.equal(ea.matched_gt, sa.matched_gt)
    o1, o2 = fresh(out), fresh(out)
    e, s = exact(o1, target), static(o2, target)
    for name in e:
        assert float(s[name]) == pytest.approx(float(e[name]), rel=1e-6, abs=1e-7)
    sum(e.values()).backward()
    sum(s.values()).backward()
    for p, q in zip(o1["pred"], o2["pred"]):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    assert all(torch.equal(b, g["boxes"]) for b, g in zip(before, target["gt"]))


def test_functional_form_matches_the_criterion_and_rectangular_inputs() -> None:
    gen = torch.Generator().manual_seed(0)
    pred = [torch.randn(2, 3, 9, 96 // s, 160 // s, generator=gen, requires_grad=True) for s in (16, 32)]
    gt = [
        {
            "boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0], [100.0, 5.0, 150.0, 40.0]]),
            "labels": torch.tensor([0, 2]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    crit = YOLOFastestLoss(anchors=V2_ANCHORS, reg_weight=3.0)
    a = crit({"pred": pred}, {"gt": gt, "img_size": (96, 160)})
    b = yolofastest_loss(pred, gt, (96, 160), anchors=V2_ANCHORS, reg_weight=3.0)
    for name in a:
        assert torch.equal(a[name], b[name])
    assert float(a.diagnostics["num_fg"]) >= 2
    with pytest.raises(losskit.ConfigError, match="iou_loss"):
        yolofastest_loss(pred, gt, 64, anchors=V2_ANCHORS, iou_loss="ciou")


# -- plugin, config file, defaults, example ---------------------------------------------------------


def test_discovered_through_the_entry_point() -> None:
    info = losskit.Registry().get("yolofastest_loss")
    assert info.cls is YOLOFastestLoss
    assert info.distribution == "losskit-detection-yolox" and info.plugin == "yolox"
    assert {ep.name: ep.value for ep in md.entry_points(group="losskit")}[
        "yolox"
    ] == "losskit_detection_yolox.plugin"
    assert losskit.registry.FIRST_PARTY["yolofastest_loss"] == "losskit-detection-yolox"


def test_netspresso_config_loads_unchanged_builds_and_runs() -> None:
    loss = losskit.build_losses(CONFIG)
    crit = loss["yolofastest_loss"]
    assert isinstance(crit, YOLOFastestLoss)
    assert crit.anchors == V2_ANCHORS and crit.config.l1_activate_epoch is None
    out, target = crit.example(2, generator=torch.Generator().manual_seed(0))
    result = loss(out, target)
    assert set(result.parts) == {f"yolofastest_loss{k}" for k in ("", "/iou", "/obj", "/cls")} | {"total"}
    assert set(result.diagnostics) == {"yolofastest_loss/num_fg", "yolofastest_loss/invalid_targets"}
    result.total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in out["pred"])


def test_defaults_are_netspresso_constants_and_anchors_are_required() -> None:
    config = YOLOFastestLoss(anchors=V2_ANCHORS).config
    assert (config.reg_weight, config.center_radius, config.candidate_topk, config.iou_cost_weight) == (
        5.0,
        1.5,
        10,
        3.0,
    )
    assert config.iou_loss == "giou" and config.normalize_across_ranks is False
    assert config.candidate_slots == YOLOXLoss().config.candidate_slots
    fields = describe_fields(YOLOFastestLossConfig)
    assert [f.name for f in fields] == [f.name for f in dataclasses.fields(YOLOFastestLossConfig)]
    assert all(f.doc for f in fields)
    with pytest.raises(losskit.ConfigError, match=r"yolofastest_loss\.anchors: required"):
        YOLOFastestLoss()
    with pytest.raises(losskit.ConfigError, match=r"yolofastest_loss\.anchors: required"):
        yolofastest_loss(
            [torch.zeros(1, 1, 6, 2, 2)], [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}], 8
        )
    assert_defaults_match(yolofastest_loss, YOLOFastestLossConfig)
    assert_defaults_match(yolofastest_assign, YOLOFastestLossConfig)
    with pytest.raises(losskit.ConfigError, match=r"level 1 has 5 values; expected \(w, h\) pairs"):
        YOLOFastestLoss(anchors=[[1, 2], [1, 2, 3, 4, 5]])
    with pytest.raises(losskit.ConfigError, match=r"anchors: item \[0\]: item \[1\]: -2 is out of range"):
        YOLOFastestLoss(anchors=[[1, -2]])
    with pytest.raises(losskit.ConfigError) as info:
        losskit.build_losses("losses:\n  - criterion: yolofastest_loss\n")
    assert "losses[0].anchors (yolofastest_loss): required" in str(info.value)


def test_example_is_small_valid_and_seeded() -> None:
    crit = YOLOFastestLoss(anchors=V2_ANCHORS)
    out, target = crit.example(3, generator=torch.Generator().manual_seed(1))
    terms = crit(out, target)
    sum(terms.values()).backward()
    assert [tuple(p.shape) for p in out["pred"]] == [(3, 3, 8, 8, 8), (3, 3, 8, 4, 4)]
    assert all(p.is_leaf and p.requires_grad for p in out["pred"])
    again, _ = crit.example(3, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(out["pred"], again["pred"]))
    assert float(terms.diagnostics["num_fg"]) > 0
    three = YOLOFastestLoss(anchors=[[10, 10], [20, 20, 30, 30], [40, 40]], num_classes=7)
    assert [tuple(p.shape) for p in three.example(1)[0]["pred"]] == [
        (1, 1, 12, 8, 8),
        (1, 2, 12, 4, 4),
        (1, 1, 12, 2, 2),
    ]
