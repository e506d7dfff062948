# SPDX-License-Identifier: Apache-2.0
"""Behaviour beyond parity: the aux branch, normaliser floor, NetsPresso config keys, precision,
kernels, memory bound and the public assignment."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from yolov9_cases import case, peak_memory

from losskit_detection_yolov9 import YOLOv9Loss, yolov9_assign, yolov9_loss
from losskit_detection_yolov9.yolov9 import _Head, softplus_sum


def test_aux_branch_gets_its_own_assignment_times_aux_weight() -> None:
    main, gt, img = case([3, 2], seed=1)
    aux, _, _ = case([3, 2], seed=2)
    crit = YOLOv9Loss(aux_weight=0.25)
    assert crit.term_names() == ("cls", "iou", "dfl", "aux_cls", "aux_iou", "aux_dfl")
    terms = crit({"pred": {"outputs": main, "aux_outputs": aux}}, {"gt": gt, "img_size": img})
    alone_main = YOLOv9Loss()({"pred": main}, {"gt": gt, "img_size": img})
    alone_aux = YOLOv9Loss()({"pred": aux}, {"gt": gt, "img_size": img})
    for k in ("cls", "iou", "dfl"):
        assert torch.equal(terms[k], alone_main[k])
        assert float(terms[f"aux_{k}"]) == pytest.approx(0.25 * float(alone_aux[k]), rel=1e-6)
    # NetsPresso's default ignores aux_outputs
    plain = YOLOv9Loss()({"pred": {"outputs": main, "aux_outputs": aux}}, {"gt": gt, "img_size": img})
    assert set(plain) == {"cls", "iou", "dfl"} and torch.equal(plain["cls"], alone_main["cls"])


def test_cls_norm_floor_and_a_batch_without_boxes() -> None:
    pred, gt, img = case([0, 0], seed=3)
    out, target = {"pred": pred}, {"gt": gt, "img_size": img}
    terms = YOLOv9Loss()(out, target)
    raw = sum(F.softplus(p[:, 64:].double()).sum() for p in pred)
    # no ground truth: cls_norm is 1, the class term is 0.5 x the raw BCE sum (as NetsPresso does)
    assert float(terms["cls"]) == pytest.approx(0.5 * float(raw), rel=1e-6)
    assert float(terms["iou"]) == float(terms["dfl"]) == 0.0
    floored = YOLOv9Loss(cls_norm_min=100.0)(out, target)
    assert float(floored["cls"]) == pytest.approx(float(terms["cls"]) / 100, rel=1e-6)
    sum(floored.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in pred)


def test_l1_activate_epoch_is_accepted_and_has_no_effect() -> None:
    pred, gt, img = case([2, 3], seed=4)
    out, target = {"pred": pred}, {"gt": gt, "img_size": img}
    a = YOLOv9Loss(l1_activate_epoch=None)(out, target)
    crit = YOLOv9Loss(l1_activate_epoch=3)
    crit.set_epoch(5)
    b = crit(out, target)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_computed_in_float32(dtype: torch.dtype) -> None:
    pred, gt, img = case([4, 3], seed=5, cls_bias=1.0)
    low = [p.detach().to(dtype).requires_grad_(True) for p in pred]
    upcast = [p.detach().float() for p in low]
    crit = YOLOv9Loss()
    terms = crit({"pred": low}, {"gt": gt, "img_size": img})
    same = crit({"pred": upcast}, {"gt": gt, "img_size": img})
    for k in terms:
        assert terms[k].dtype == torch.float32 and torch.equal(terms[k], same[k])
    sum(terms.values()).backward()
    assert all(p.grad.dtype == dtype and torch.isfinite(p.grad).all() for p in low)


def test_under_cpu_autocast_bf16_the_result_is_the_float32_one() -> None:
    torch.manual_seed(0)
    head = torch.nn.Conv2d(8, 4 * 16 + 3, 1)
    feats = [torch.randn(2, 8, s, s) for s in (8, 4, 2)]
    _, gt, img = case([3, 2], seed=6)
    crit = YOLOv9Loss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        levels = [head(f) for f in feats]
        terms = crit({"pred": levels}, {"gt": gt, "img_size": img})
    assert all(p.dtype == torch.bfloat16 for p in levels)
    plain = crit({"pred": [p.float() for p in levels]}, {"gt": gt, "img_size": img})
    for k in terms:
        assert terms[k].dtype == torch.float32 and torch.equal(terms[k], plain[k])
    sum(terms.values()).backward()
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()


def test_softplus_sum_matches_float64() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 700, 101, generator=gen) * 8  # several chunks, partial last blocks
    want = float(F.softplus(x.double()).sum())
    assert float(softplus_sum(x)) == pytest.approx(want, rel=1e-6)
    big = torch.tensor([-200.0, -30.0, 0.0, 30.0, 200.0] * 7).view(1, 5, 7)
    assert float(softplus_sum(big)) == pytest.approx(float(F.softplus(big.double()).sum()), rel=1e-6)


def test_head_function_gradcheck_float64() -> None:
    gen = torch.Generator().manual_seed(1)
    levels = [
        torch.randn(2, 4 * 3 + 2, h, w, generator=gen, dtype=torch.float64) for h, w in ((3, 3), (2, 1))
    ]
    levels = [p.requires_grad_(True) for p in levels]
    index = torch.tensor([[0, 9, 10, 4], [10, 2, 9, 1]])  # anchors of both levels
    labels = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0]])

    def fn(*ls: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _Head.apply(index, labels, 12, torch.float64, *ls)

    assert torch.autograd.gradcheck(fn, tuple(levels))


def test_public_assignment() -> None:
    pred, gt, img = case([4, 0, 2], seed=7)
    crit = YOLOv9Loss()
    a = crit.assign({"pred": pred}, {"gt": gt, "img_size": img})
    assert a.fg_mask.shape == a.matched_gt.shape == a.scores.shape == (3, 84)
    assert a.fg_mask.dtype == torch.bool and a.matched_gt.dtype == torch.int64
    assert torch.equal(a.fg_mask, a.matched_gt >= 0) and not a.fg_mask[1].any()
    assert int(a.matched_gt[0].max()) < 4 and int(a.matched_gt[2].max()) < 2
    assert torch.equal(a.labels[a.fg_mask], torch.cat([gt[0]["labels"][a.matched_gt[0][a.fg_mask[0]]],
                                                       gt[2]["labels"][a.matched_gt[2][a.fg_mask[2]]]]))  # fmt: skip
    same = yolov9_assign(pred, gt, img)
    assert torch.equal(same.matched_gt, a.matched_gt) and torch.equal(same.scores, a.scores)
    terms = yolov9_loss(pred, gt, img)
    assert float(terms.diagnostics["num_fg"]) == float(a.fg_mask.sum())
    assert float(terms.diagnostics["cls_norm"]) == pytest.approx(max(1.0, float(a.scores.sum())))


def test_500_boxes_in_one_image_stay_under_1_gb() -> None:
    pred, gt, img = case([500], img=(640, 640), num_classes=80, seed=8, max_size=120)
    crit = YOLOv9Loss()

    def step() -> None:
        terms = crit({"pred": pred}, {"gt": gt, "img_size": img})
        sum(terms.values()).backward()

    peak = peak_memory(step)
    assert 0 < peak < 1 << 30
    assert all(torch.isfinite(p.grad).all() for p in pred)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("assigner", ["netspresso", "upstream"])
def test_cuda_forward_and_backward_without_host_sync(assigner: str) -> None:
    from losskit.testing import no_host_sync

    pred, gt, img = case([5, 0, 3], seed=9, cls_bias=1.0)
    levels = [p.detach().cuda().requires_grad_(True) for p in pred]
    gts = [{k: v.cuda() for k, v in g.items()} for g in gt]
    crit = YOLOv9Loss(assigner=assigner)
    want = crit({"pred": pred}, {"gt": gt, "img_size": img})
    with no_host_sync():
        terms = crit({"pred": levels}, {"gt": gts, "img_size": img})
        terms.total.backward()
    for k in want:
        assert float(terms[k]) == pytest.approx(float(want[k]), rel=1e-4)
