# SPDX-License-Identifier: Apache-2.0
"""Matcher edge cases: the batched matching equals torchvision's Matcher image by image."""

from __future__ import annotations

import pytest
import retinanet_cases as tl
import torch

from losskit_detection_retinanet import RetinaNetLoss
from losskit_detection_retinanet import _match as _match_module
from losskit_detection_retinanet._match import match_anchors, pad_gt, prepare_gt


def _match(anchors, boxes_per_image, **cfg):
    b = len(boxes_per_image)
    crit = RetinaNetLoss(**cfg)
    out = {
        "cls_logits": torch.zeros(b, anchors.shape[0], 2),
        "bbox_regression": torch.zeros(b, anchors.shape[0], 4),
        "anchors": anchors,
    }
    gt = [{"boxes": x, "labels": torch.zeros(x.shape[0], dtype=torch.int64)} for x in boxes_per_image]
    return crit.match(out, {"gt": gt})


def _reference(anchors, boxes_per_image, **cfg):
    return torch.stack([tl.torchvision_matches(x, anchors, **cfg) for x in boxes_per_image])


ANCHORS = torch.tensor(
    [
        [0.0, 0.0, 10.0, 10.0],
        [0.0, 0.0, 10.0, 10.0],  # duplicate anchor: ties for every gt
        [5.0, 5.0, 15.0, 15.0],
        [20.0, 20.0, 30.0, 30.0],
        [40.0, 40.0, 60.0, 60.0],
        [100.0, 100.0, 110.0, 110.0],
    ]
)


def test_low_quality_gt_keeps_its_best_anchors_including_ties():
    # overlaps anchors 0 and 1 (tie) with IoU 0.25 only: below both thresholds
    gt = torch.tensor([[0.0, 0.0, 5.0, 5.0]])
    got = _match(ANCHORS, [gt])
    assert got[0, :2].tolist() == [0, 0]
    assert torch.equal(got, _reference(ANCHORS, [gt]))
    off = _match(ANCHORS, [gt], allow_low_quality_matches=False)
    assert off[0, :2].tolist() == [-1, -1]
    assert torch.equal(off, _reference(ANCHORS, [gt], allow_low_quality_matches=False))


def test_ties_between_gts_take_the_first():
    gt = torch.tensor([[20.0, 20.0, 30.0, 30.0], [20.0, 20.0, 30.0, 30.0], [40.0, 40.0, 60.0, 60.0]])
    got = _match(ANCHORS, [gt])
    assert got[0, 3] == 0 and got[0, 4] == 2
    assert torch.equal(got, _reference(ANCHORS, [gt]))


def test_equal_thresholds_leave_nothing_ignored():
    gt = torch.tensor([[0.0, 0.0, 12.0, 12.0], [22.0, 22.0, 34.0, 34.0]])
    got = _match(ANCHORS, [gt], fg_iou_thresh=0.45, bg_iou_thresh=0.45, allow_low_quality_matches=False)
    assert not bool((got == -2).any())
    ref = _reference(ANCHORS, [gt], fg_iou_thresh=0.45, bg_iou_thresh=0.45, allow_low_quality_matches=False)
    assert torch.equal(got, ref)


def test_between_thresholds_is_ignored():
    gt = torch.tensor([[20.0, 20.0, 32.0, 31.0]])  # IoU 100/132 = 0.76 with anchor 3
    got = _match(ANCHORS, [gt], fg_iou_thresh=0.8, bg_iou_thresh=0.5, allow_low_quality_matches=False)
    assert got[0, 3] == -2


def test_gt_overlapping_no_anchor_matches_every_zero_iou_anchor_like_torchvision():
    """torchvision's quirk, kept for parity: a gt whose best IoU is 0 ties with every anchor at 0."""
    gt = torch.tensor([[200.0, 200.0, 210.0, 210.0], [0.0, 0.0, 10.0, 10.0]])
    got = _match(ANCHORS, [gt])
    assert torch.equal(got, _reference(ANCHORS, [gt]))
    assert bool((got >= 0).all())


def test_empty_images_and_empty_batch():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    got = _match(ANCHORS, [torch.zeros(0, 4), gt, torch.zeros(0, 4)])
    assert bool((got[0] == -1).all()) and bool((got[2] == -1).all())
    assert torch.equal(got, _reference(ANCHORS, [torch.zeros(0, 4), gt, torch.zeros(0, 4)]))
    none = _match(ANCHORS, [torch.zeros(0, 4), torch.zeros(0, 4)])
    assert none.shape == (2, 6) and bool((none == -1).all())


@pytest.mark.parametrize("seed", range(6))
def test_integer_grid_random_cases(seed):
    """Integer coordinates on a coarse grid: many exact ties, between gts and between anchors."""
    g = torch.Generator().manual_seed(seed)

    def boxes(n):
        xy = torch.randint(0, 8, (n, 2), generator=g).float() * 4
        wh = torch.randint(1, 5, (n, 2), generator=g).float() * 4
        return torch.cat([xy, xy + wh], 1)

    anchors = boxes(60)
    gts = [boxes(int(n)) for n in torch.randint(0, 9, (4,), generator=g)]
    for cfg in ({}, {"allow_low_quality_matches": False}, {"fg_iou_thresh": 0.3, "bg_iou_thresh": 0.3}):
        assert torch.equal(_match(anchors, gts, **cfg), _reference(anchors, gts, **cfg))


def test_match_function_directly_on_padding():
    boxes, _, valid = pad_gt(
        [torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.zeros(0, 4)],
        [torch.tensor([1]), torch.zeros(0, dtype=torch.int64)],
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
    m = match_anchors(
        boxes, valid, ANCHORS, fg_iou_thresh=0.5, bg_iou_thresh=0.4, allow_low_quality_matches=True
    )
    assert m.dtype == torch.int64 and m.shape == (2, 6)
    assert m[0, :2].tolist() == [0, 0] and bool((m[1] == -1).all())


def _grid_boxes(n, g):
    xy = torch.randint(0, 8, (n, 2), generator=g).float() * 4
    wh = torch.randint(1, 5, (n, 2), generator=g).float() * 4
    return torch.cat([xy, xy + wh], 1)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("max_elements", [1, 60 * 3, 60 * 7])
def test_chunked_matching_equals_one_block(seed, max_elements, monkeypatch):
    """Gts matched image by image in chunks of a few rows give the matches of one batched block (and of
    torchvision), with ties, skewed counts, invalid gts and per-image anchors; no block exceeds the bound."""
    g = torch.Generator().manual_seed(seed)
    anchors = _grid_boxes(60, g)
    counts = [int(n) for n in torch.randint(0, 12, (4,), generator=g)]
    counts[0] = 17  # one crowded image: padding to it wastes most of the batch
    boxes = [_grid_boxes(n, g) for n in counts]
    labels = [torch.randint(0, 3, (n,), generator=g) for n in counts]
    boxes[0][3] = torch.tensor([8.0, 8.0, 8.0, 20.0])  # degenerate: left out
    labels[0][5] = 3  # out of range for C = 3: left out
    per_image = torch.stack([anchors, anchors.flip(0), anchors, anchors + 2.0])
    sizes = []
    real_iou = _match_module.batched_box_iou

    def recording_iou(b, a):
        sizes.append(b.shape[0] * b.shape[1] * a.shape[-2])
        return real_iou(b, a)

    monkeypatch.setattr(_match_module, "batched_box_iou", recording_iou)
    for anc in (anchors, per_image):
        for cfg in ({"allow_low_quality_matches": True}, {"allow_low_quality_matches": False}):
            gt = prepare_gt(boxes, labels, num_classes=3, dtype=torch.float32, device=torch.device("cpu"))
            kw = {"fg_iou_thresh": 0.5, "bg_iou_thresh": 0.4, **cfg}
            # without counts every image is taken to hold G gts: nothing is wasted, one block
            sizes.clear()
            one = match_anchors(gt.boxes, gt.valid, anc, max_elements=10**9, **kw)
            assert sizes == [4 * 17 * 60]
            sizes.clear()
            chunked = match_anchors(
                gt.boxes, gt.valid, anc, counts=gt.counts, max_elements=max_elements, **kw
            )
            assert len(sizes) >= 4 and max(sizes) <= max(max_elements, 60)
            assert torch.equal(chunked, one)
            keep = [gt.valid[i, :n] for i, n in enumerate(counts)]
            for i in range(4):
                a_i = anc if anc.dim() == 2 else anc[i]
                ref = tl.torchvision_matches(boxes[i][keep[i]], a_i, **cfg)
                # torchvision indexes the kept boxes: map back to the given list
                index = keep[i].nonzero().flatten()
                ref = torch.where(ref >= 0, index[ref.clamp(min=0)], ref) if index.numel() else ref
                assert torch.equal(chunked[i], ref)
    assert float(gt.num_invalid) == 2.0
