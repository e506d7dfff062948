# SPDX-License-Identifier: Apache-2.0
"""YOLO's IoU/CIoU convention: against torchvision where they agree, finite on flat boxes, the in-place
pairwise form bit-identical, gradients."""

from __future__ import annotations

import pytest
import torch
import torchvision

from losskit_ops import YoloBoxParts, yolo_box_iou, yolo_box_parts, yolo_pairwise_ciou_


def _boxes(n: int, gen: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * 50
    return torch.cat((xy, xy + torch.rand(n, 2, generator=gen) * 30 + 1), 1)


def test_against_torchvision_where_the_eps_placement_does_not_matter() -> None:
    gen = torch.Generator().manual_seed(2)
    b1, b2 = _boxes(40, gen).double(), _boxes(30, gen).double()
    ours = yolo_box_iou(b1[:, None], b2[None])
    # torchvision puts no eps inside the aspect term and 1 - iou + v + eps in alpha: equal to 1e-6 here
    torch.testing.assert_close(ours, torchvision.ops.complete_box_iou(b1, b2, eps=1e-7), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        yolo_box_iou(b1[:, None], b2[None], kind="iou"), torchvision.ops.box_iou(b1, b2)
    )


def test_flat_boxes_stay_finite_where_torchvision_gives_nan() -> None:
    gen = torch.Generator().manual_seed(3)
    b2 = _boxes(10, gen)
    flat = torch.tensor([[0.0, 5.0, 10.0, 5.0], [3.0, 3.0, 3.0, 3.0]])
    assert torch.isfinite(yolo_box_iou(flat[:, None], b2[None])).all()
    assert torch.isnan(torchvision.ops.complete_box_iou(flat, b2)).any()
    # a point inside nothing: IoU 0, CIoU = -d^2 / c^2 - alpha v
    same = yolo_box_iou(flat[1], flat[1])
    assert float(same) == 0.0


def test_hand_checked_pair() -> None:
    a = torch.tensor([0.0, 0.0, 2.0, 2.0])
    b = torch.tensor([1.0, 0.0, 3.0, 2.0])
    # IoU = 2 / 6; centres 1 apart, enclosing diagonal^2 = 9 + 4; same aspect: v = 0
    assert float(yolo_box_iou(a, b)) == pytest.approx(2 / 6 - 1 / 13, abs=1e-6)


def test_in_place_pairwise_form_gives_the_same_bits() -> None:
    gen = torch.Generator().manual_seed(4)
    b1, b2 = _boxes(40, gen), _boxes(30, gen)
    b2[0, 3] = b2[0, 1]  # a zero-height box
    a = yolo_box_parts(*(b1[:, i : i + 1] for i in range(4)))
    pairs = torch.stack(yolo_box_parts(*b2.T), 0)[:, None].expand(8, 40, 30).clone()
    got = yolo_pairwise_ciou_(a, YoloBoxParts(*pairs.unbind(0)))
    assert torch.equal(got, yolo_box_iou(b1[:, None], b2[None]))


def test_gradcheck_float64_alpha_detached() -> None:
    gen = torch.Generator().manual_seed(5)
    b1 = _boxes(4, gen).double().requires_grad_(True)
    b2 = _boxes(4, gen).double()

    def iou_only(x: torch.Tensor) -> torch.Tensor:
        return yolo_box_iou(x, b2, kind="iou")

    assert torch.autograd.gradcheck(iou_only, (b1,))
    # CIoU's alpha is detached (as in the paper): its gradient is the IoU's minus d(d^2/c^2) and alpha dv
    (g,) = torch.autograd.grad(yolo_box_iou(b1, b2).sum(), b1)
    assert torch.isfinite(g).all()


def test_bad_kind() -> None:
    with pytest.raises(ValueError, match="'iou' or 'ciou'"):
        yolo_box_iou(torch.zeros(4), torch.zeros(4), kind="giou")  # type: ignore[arg-type]
