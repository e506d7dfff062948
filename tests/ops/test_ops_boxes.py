# SPDX-License-Identifier: Apache-2.0
"""losskit_ops.boxes against torchvision.ops: the IoU family, batched pairwise IoU, box-delta coding."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.models.detection._utils import BoxCoder

from losskit_ops.boxes import batched_box_iou, box_iou_aligned, decode_deltas, encode_deltas

TV_LOSSES = {
    "giou": torchvision.ops.generalized_box_iou_loss,
    "diou": torchvision.ops.distance_box_iou_loss,
    "ciou": torchvision.ops.complete_box_iou_loss,
}


def _boxes(n: int, seed: int, dtype: torch.dtype = torch.float32, size: float = 64.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * size
    wh = 1.0 + torch.rand(n, 2, generator=g, dtype=torch.float64) * size / 2
    return torch.cat([xy, xy + wh], dim=1).to(dtype)


@pytest.mark.parametrize("kind", ["giou", "diou", "ciou"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_aligned_matches_torchvision_losses_values_and_gradients(kind, dtype):
    a, b = _boxes(200, 0, dtype), _boxes(200, 1, dtype)
    a1, a2 = a.clone().requires_grad_(), a.clone().requires_grad_()
    b1, b2 = b.clone().requires_grad_(), b.clone().requires_grad_()
    ours = 1 - box_iou_aligned(a1, b1, kind=kind)
    ref = TV_LOSSES[kind](a2, b2)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)
    w = torch.rand(200, dtype=dtype)
    ga = torch.autograd.grad((ours * w).sum(), (a1, b1))
    gb = torch.autograd.grad((ref * w).sum(), (a2, b2))
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=10 * tol, atol=10 * tol)


def test_aligned_iou_matches_box_iou_diagonal_and_broadcasts_pairwise():
    a, b = _boxes(7, 2), _boxes(5, 3)
    pairwise = box_iou_aligned(a[:, None], b[None], eps=0.0)
    torch.testing.assert_close(pairwise, torchvision.ops.box_iou(a, b), rtol=1e-6, atol=1e-7)
    giou = box_iou_aligned(a[:, None], b[None], kind="giou", eps=0.0)
    torch.testing.assert_close(giou, torchvision.ops.generalized_box_iou(a, b), rtol=1e-6, atol=1e-6)
    batched = box_iou_aligned(torch.stack([a, a])[:, :, None], torch.stack([b, b])[:, None], kind="ciou")
    assert batched.shape == (2, 7, 5)
    torch.testing.assert_close(batched[1], box_iou_aligned(a[:, None], b[None], kind="ciou"))


def test_aligned_hand_checked_values():
    unit = torch.tensor([0.0, 0.0, 2.0, 2.0])
    shifted = torch.tensor([1.0, 0.0, 3.0, 2.0])  # overlap 2, union 6
    assert box_iou_aligned(unit, shifted, eps=0.0).item() == pytest.approx(1 / 3)
    # hull is 3 x 2 = 6 = union: GIoU = IoU
    assert box_iou_aligned(unit, shifted, kind="giou", eps=0.0).item() == pytest.approx(1 / 3)
    # centres 1 apart, hull diagonal^2 = 9 + 4: DIoU = 1/3 - 1/13; same aspect ratio: CIoU = DIoU
    expected = 1 / 3 - 1 / 13
    assert box_iou_aligned(unit, shifted, kind="diou", eps=0.0).item() == pytest.approx(expected)
    assert box_iou_aligned(unit, shifted, kind="ciou", eps=0.0).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="kind='xiou'"):
        box_iou_aligned(unit, shifted, kind="xiou")  # type: ignore[arg-type]


def test_gradcheck_float64():
    a = _boxes(6, 4, torch.float64).requires_grad_()
    b = _boxes(6, 5, torch.float64).requires_grad_()
    for kind in ("iou", "giou", "diou"):
        assert torch.autograd.gradcheck(lambda x, y, k=kind: box_iou_aligned(x, y, kind=k), (a, b))


def test_batched_iou_is_bit_identical_to_box_iou():
    anchors = _boxes(300, 6, size=128.0)
    per_image = [_boxes(n, 10 + n, size=128.0) for n in (5, 1, 9)]
    padded = torch.nn.utils.rnn.pad_sequence(per_image, batch_first=True)
    iou = batched_box_iou(padded, anchors)
    assert iou.shape == (3, 9, 300)
    for i, x in enumerate(per_image):
        assert torch.equal(iou[i, : len(x)], torchvision.ops.box_iou(x, anchors))
    stacked = torch.stack([anchors, anchors + 1.0, anchors * 0.5])
    iou3 = batched_box_iou(padded, stacked)
    for i, x in enumerate(per_image):
        assert torch.equal(iou3[i, : len(x)], torchvision.ops.box_iou(x, stacked[i]))


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_coding_is_bit_identical_to_boxcoder(weights):
    anchors = _boxes(500, 7, size=128.0)
    g = torch.Generator().manual_seed(2)
    boxes = _boxes(500, 8, size=128.0)
    deltas = torch.randn(500, 4, generator=g) * 3.0  # some dw, dh above the clip
    coder = BoxCoder(weights)
    assert torch.equal(encode_deltas(boxes, anchors, weights), coder.encode_single(boxes, anchors))
    assert torch.equal(
        decode_deltas(deltas, anchors, weights, coder.bbox_xform_clip), coder.decode_single(deltas, anchors)
    )
