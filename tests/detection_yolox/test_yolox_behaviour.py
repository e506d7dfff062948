# SPDX-License-Identifier: Apache-2.0
"""Hand-checkable cases, invariants, empty batches, fixed keys, set_epoch and the public assignment."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from yolox_cases import fresh, make_batch

import losskit
from losskit_detection_yolox import YOLOXLoss, yolox_assign, yolox_loss

LOG2 = math.log(2.0)


def one_level(num_classes: int = 2) -> torch.Tensor:
    """A 4x4 level (stride 8 on a 32x32 input): every cell predicts an 8x8 box on itself, logits 0."""
    p = torch.zeros(1, 5 + num_classes, 4, 4)
    p[0, 0:2] = 0.5
    return p


def run(p: torch.Tensor, boxes: list[list[float]], labels: list[int], *, epoch: int = 0, **fields):
    crit = YOLOXLoss(**fields)
    crit.set_epoch(epoch)
    out = {"pred": [p.clone().requires_grad_(True)]}
    target = {"gt": [{"boxes": torch.tensor(boxes), "labels": torch.tensor(labels)}], "img_size": 32}
    return crit(out, target), crit.assign(out, target), out


def test_one_box_one_level_by_hand() -> None:
    # box (8, 8, 16, 16): centre (12, 12); its prior is the 3x3 cells with centres 4, 12, 20 on each axis.
    # Cell (1, 1) predicts it exactly (IoU 1); the others only touch it (IoU 0), so dynamic_k = 1.
    p = one_level()
    terms, a, _ = run(p, [[8, 8, 16, 16]], [1], epoch=1)
    assert a.fg_mask[0].nonzero().flatten().tolist() == [5]  # row 1, column 1
    assert a.matched_gt[0, 5] == 0 and (a.matched_gt[0] >= 0).sum() == 1
    assert a.matched_iou[0, 5] == 1.0
    assert a.dynamic_k.tolist() == [[1]]
    assert terms.diagnostics["num_fg"] == 1
    assert float(terms["iou"]) == pytest.approx(0.0, abs=1e-6)  # 5 * (1 - 1^2)
    assert float(terms["obj"]) == pytest.approx(16 * LOG2, rel=1e-6)  # 16 anchors, logit 0
    assert float(terms["cls"]) == pytest.approx(2 * LOG2, rel=1e-6)  # 2 classes, logit 0
    # L1 target of cell (1, 1): [12/8 - 1, 12/8 - 1, log(8/8 + 1e-8), log(1 + 1e-8)] = raw [.5, .5, 0, 0]
    assert float(terms["l1"]) == pytest.approx(0.0, abs=1e-6)


def test_l1_and_iou_terms_by_hand() -> None:
    p = one_level()
    p[0, 0, 1, 1] = 0.25  # centre x = (0.25 + 1) * 8 = 10: box (6, 8, 14, 16), IoU with the gt 6/10
    terms, a, _ = run(p, [[8, 8, 16, 16]], [0], epoch=1)
    assert a.fg_mask[0].nonzero().flatten().tolist() == [5]
    iou = 48 / 80
    assert float(a.matched_iou[0, 5]) == pytest.approx(iou, rel=1e-6)
    assert float(terms["iou"]) == pytest.approx(5.0 * (1 - iou**2), rel=1e-6)
    assert float(terms["l1"]) == pytest.approx(0.25, rel=1e-5)
    # class target is onehot * IoU: BCE(0, 0.6) = log 2 for class 0 and log 2 for class 1
    assert float(terms["cls"]) == pytest.approx(2 * LOG2, rel=1e-6)
    giou, _, _ = run(p, [[8, 8, 16, 16]], [0], iou_loss="giou")
    assert float(giou["iou"]) == pytest.approx(5.0 * (1 - iou), rel=1e-6)  # the hull is the union here


def test_dynamic_k_counts_the_top_ious() -> None:
    p = one_level()
    ys, xs = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    p[0, 0], p[0, 1] = 1.5 - xs, 1.5 - ys  # every cell predicts the box centred at (12, 12), 8 x 8
    terms, a, _ = run(p, [[8, 8, 16, 16]], [0])
    # 16 candidates... no: only the 9 prior cells are candidates; all have IoU 1, so k = int(9.0) = 9
    assert a.dynamic_k.tolist() == [[9]]
    prior = [r * 4 + c for r in range(3) for c in range(3)]
    assert a.fg_mask[0].nonzero().flatten().tolist() == prior
    assert float(terms["iou"]) == pytest.approx(0.0, abs=1e-6)
    assert terms.diagnostics["num_fg"] == 9


def test_cells_outside_the_centre_prior_are_never_foreground() -> None:
    p = one_level()
    p[0, 0, 3, 3], p[0, 1, 3, 3] = 1.5 - 3, 1.5 - 3  # cell (3, 3) predicts the box exactly
    _, a, _ = run(p, [[8, 8, 16, 16]], [0])
    assert not a.fg_mask[0, 15]


def test_conflict_goes_to_the_lowest_cost_box() -> None:
    # boxes A (8, 8, 16, 16) class 0 and B (9, 9, 17, 17) class 1 both pick cell (1, 1) (k = 1 each).
    p = one_level()
    _, a, _ = run(p, [[8, 8, 16, 16], [9, 9, 17, 17]], [0, 1])
    assert a.fg_mask[0].nonzero().flatten().tolist() == [5]
    assert a.matched_gt[0, 5] == 0  # equal class costs; A's IoU cost is 0, B's 3 * -log(49/79)
    # now cell (1, 1) is confident in class 1: A's class cost ~9.0 > B's ~0.05 + 1.43
    p[0, 4, 1, 1], p[0, 5, 1, 1], p[0, 6, 1, 1] = 6.0, -6.0, 6.0
    _, a, _ = run(p, [[8, 8, 16, 16], [9, 9, 17, 17]], [0, 1])
    assert a.fg_mask[0].nonzero().flatten().tolist() == [5]
    assert a.matched_gt[0, 5] == 1
    assert float(a.matched_iou[0, 5]) == pytest.approx(49 / 79, rel=1e-6)


def prior_mask(target: dict, grid_sides: list[int], radius: float = 1.5) -> torch.Tensor:
    """(B, A) anchors within the centre prior of any box, written plainly (for the invariant test)."""
    img = target["img_size"]
    masks = []
    for item in target["gt"]:
        per_level = []
        for side in grid_sides:
            s = img / side
            c = (torch.arange(side) + 0.5) * s
            cx = (item["boxes"][:, 0] + item["boxes"][:, 2]) / 2
            cy = (item["boxes"][:, 1] + item["boxes"][:, 3]) / 2
            inx = (c[None, :] - cx[:, None]).abs() < radius * s
            iny = (c[None, :] - cy[:, None]).abs() < radius * s
            per_level.append((iny[:, :, None] & inx[:, None, :]).flatten(1).any(0))
        masks.append(torch.cat(per_level))
    return torch.stack(masks)


@pytest.mark.parametrize("seed", range(4))
def test_assignment_invariants(seed: int) -> None:
    out, target = make_batch(
        seed, batch=4, num_classes=5, img=128, gts=(0, 40), kind="mixed", duplicates=True
    )
    crit = YOLOXLoss()
    a = crit.assign(out, target)
    counts = [len(g["labels"]) for g in target["gt"]]
    num_anchors = a.fg_mask.shape[1]
    assert num_anchors == 16 * 16 + 8 * 8 + 4 * 4
    assert a.fg_mask.dtype == torch.bool and a.matched_gt.dtype == torch.int64
    assert torch.equal(a.fg_mask, a.matched_gt >= 0)  # every fg anchor has exactly one gt, bg has none
    assert ((a.matched_iou >= 0) & (a.matched_iou <= 1)).all()
    assert (a.matched_iou[~a.fg_mask] == 0).all()
    near = prior_mask(target, [16, 8, 4])
    assert not (a.fg_mask & ~near).any()  # foreground lies in some box's centre prior
    for i, n in enumerate(counts):
        assert int(a.matched_gt[i].max()) < max(n, 1)
        k = a.dynamic_k[i, :n]
        assert ((k >= 1) & (k <= crit.config.candidate_topk)).all()  # these boxes all have candidates
        assert (a.dynamic_k[i, n:] == 0).all()
        assert int(a.fg_mask[i].sum()) <= int(k.sum())  # each fg anchor was chosen by some box
        assert (int(a.fg_mask[i].sum()) >= 1) == (n > 0)
    terms = crit(out, target)
    assert float(terms.diagnostics["num_fg"]) == float(a.fg_mask.sum())


def test_translation_by_whole_strides_leaves_the_loss_unchanged() -> None:
    out, target = make_batch(3, batch=2, num_classes=4, img=256, counts=[6, 9], informed=1.0)
    for item in target["gt"]:  # keep boxes in the middle so the shift wraps no prediction near a box
        item["boxes"] = item["boxes"] * 0.4 + 40.0
    dx, dy = 64, 32  # whole strides of every level (8, 16, 32)
    shifted_target = {
        "gt": [
            {"boxes": g["boxes"] + torch.tensor([dx, dy, dx, dy]), "labels": g["labels"]}
            for g in target["gt"]
        ],
        "img_size": 256,
    }
    shifted_out = {
        "pred": [
            torch.roll(
                p.detach(), shifts=(dy * p.shape[2] // 256, dx * p.shape[3] // 256), dims=(2, 3)
            ).requires_grad_()
            for p in out["pred"]
        ]
    }
    crit = YOLOXLoss()
    crit.set_epoch(1)
    base, moved = crit(out, target), crit(shifted_out, shifted_target)
    for name in base:
        assert float(moved[name]) == pytest.approx(float(base[name]), rel=1e-5, abs=1e-6), name
    assert base.diagnostics["num_fg"] == moved.diagnostics["num_fg"]


def test_all_empty_batch_is_objectness_only_with_the_graph_intact() -> None:
    out, target = make_batch(0, batch=3, num_classes=4, img=64, counts=[0, 0, 0])
    crit = YOLOXLoss()
    crit.set_epoch(5)
    terms = crit(out, target)
    assert tuple(terms) == ("iou", "obj", "cls", "l1")
    assert terms.diagnostics["num_fg"] == 0
    assert float(terms["iou"]) == float(terms["cls"]) == float(terms["l1"]) == 0.0
    obj = torch.cat([p.detach()[:, 4].flatten(1) for p in out["pred"]], 1)
    expected = F.binary_cross_entropy_with_logits(obj, torch.zeros_like(obj), reduction="sum")  # / max(0, 1)
    assert float(terms["obj"]) == pytest.approx(float(expected), rel=1e-6)
    terms.total.backward()
    for p in out["pred"]:
        assert torch.isfinite(p.grad).all()
        assert (p.grad[:, 4] != 0).all() and (p.grad[:, :4] == 0).all() and (p.grad[:, 5:] == 0).all()


def test_boxes_outside_the_grid_have_no_candidates() -> None:
    # YOLOX raises (topk on zero candidates) when an image has boxes but no candidate anchor at all;
    # here such boxes simply get no foreground.
    out, target = make_batch(1, batch=2, num_classes=3, img=64, counts=[2, 1])
    target["gt"][0]["boxes"] = torch.tensor([[500.0, 500.0, 520.0, 530.0], [-90.0, -90.0, -70.0, -60.0]])
    crit = YOLOXLoss()
    a = crit.assign(out, target)
    assert not a.fg_mask[0].any() and a.fg_mask[1].any()
    assert a.dynamic_k[0].tolist() == [0, 0]
    terms = crit(out, target)
    terms.total.backward()
    assert all(torch.isfinite(t) for t in terms.values())


def test_zero_batch() -> None:
    pred = [torch.zeros(0, 8, s, s, requires_grad=True) for s in (4, 2)]
    terms = yolox_loss(pred, [], 32)
    assert all(float(t) == 0.0 for t in terms.values())
    terms.total.backward()
    assert yolox_assign(pred, [], 32).fg_mask.shape == (0, 20)


@pytest.mark.parametrize("counts", [[0, 0], [0, 30], [50, 50], [1, 0]])
@pytest.mark.parametrize("epoch", [0, 3])
def test_term_and_diagnostic_keys_never_change(counts: list[int], epoch: int) -> None:
    out, target = make_batch(2, batch=2, num_classes=3, img=64, counts=counts)
    crit = YOLOXLoss()
    crit.set_epoch(epoch)
    terms = crit(out, target)
    assert tuple(terms) == crit.term_names() == ("iou", "obj", "cls", "l1")
    assert tuple(terms.diagnostics) == crit.diagnostic_names() == ("num_fg", "l1_active", "invalid_targets")
    assert all(t.dim() == 0 and t.dtype == torch.float32 for t in terms.values())
    assert all(t.requires_grad for t in terms.values())


def test_set_epoch_switches_l1() -> None:
    out, target = make_batch(4, batch=2, num_classes=3, img=64, counts=[3, 2])
    crit = YOLOXLoss(l1_activate_epoch=3)
    seen = []
    for epoch in [None, 0, 2, 3, 7, 1]:
        if epoch is not None:
            crit.set_epoch(epoch)
        terms = crit(out, target)
        seen.append((float(terms["l1"]) > 0, float(terms.diagnostics["l1_active"])))
    assert seen == [(False, 0.0)] * 3 + [(True, 1.0)] * 2 + [(False, 0.0)]
    with pytest.raises(losskit.ConfigError):
        crit.set_epoch(-1)
    # the default switches at epoch 1; through a composite as well
    loss = losskit.build_losses([{"criterion": "yolox_loss"}])
    assert float(loss(out, target).parts["yolox_loss/l1"]) == 0.0
    loss.set_epoch(1)
    assert float(loss(out, target).parts["yolox_loss/l1"]) > 0.0


def test_the_functional_form_matches_the_criterion() -> None:
    out, target = make_batch(6, batch=3, num_classes=4, img=64, gts=(0, 5))
    crit = YOLOXLoss(iou_loss="giou", reg_weight=3.0)
    crit.set_epoch(1)
    a = crit(out, target)
    b = yolox_loss(out["pred"], target["gt"], 64, use_l1=True, iou_loss="giou", reg_weight=3.0)
    for name in a:
        assert torch.equal(a[name], b[name])
    with pytest.raises(losskit.ConfigError, match="iou_loss"):
        yolox_loss(out["pred"], target["gt"], 64, iou_loss="ciou")


def test_static_and_exact_candidate_slots_agree() -> None:
    out, target = make_batch(8, batch=3, num_classes=5, img=128, gts=(0, 30), kind="mixed", informed=0.8)
    exact = YOLOXLoss(candidate_slots="exact")
    static = YOLOXLoss(candidate_slots="static")
    ea, sa = exact.assign(out, target), static.assign(out, target)
    assert torch.equal(ea.fg_mask, sa.fg_mask) and torch.equal(ea.matched_gt, sa.matched_gt)
    assert torch.equal(ea.matched_iou, sa.matched_iou) and torch.equal(ea.dynamic_k, sa.dynamic_k)
    o1, o2 = fresh(out), fresh(out)
    e, s = exact(o1, target), static(o2, target)
    for name in e:
        assert float(s[name]) == pytest.approx(float(e[name]), rel=1e-6, abs=1e-7)
    e.total.backward()
    s.total.backward()
    for p, q in zip(o1["pred"], o2["pred"]):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_rectangular_inputs_and_explicit_strides() -> None:
    # 96 x 160 input, strides 8/16/32 on both axes
    gen = torch.Generator().manual_seed(0)
    pred = [torch.randn(2, 8, 96 // s, 160 // s, generator=gen, requires_grad=True) for s in (8, 16, 32)]
    gt = [
        {
            "boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0], [100.0, 5.0, 150.0, 40.0]]),
            "labels": torch.tensor([0, 2]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    a = yolox_loss(pred, gt, (96, 160), use_l1=True)
    b = yolox_loss(pred, gt, 12345, use_l1=True, strides=(8, 16, 32))  # img_size ignored for strides
    for name in a:
        assert torch.equal(a[name], b[name])
    assert float(a.diagnostics["num_fg"]) >= 2
