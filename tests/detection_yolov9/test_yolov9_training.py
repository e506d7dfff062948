# SPDX-License-Identifier: Apache-2.0
"""A tiny detector trained with yolov9_loss (boxes move onto the ground truths), data-parallel
equivalence with the global normaliser."""

from __future__ import annotations

import math

import torch
from torch import nn
from yolov9_cases import ddp_rank, head_features, shared_head_grads

from losskit.testing import run_on_ranks
from losskit_detection_yolov9 import YOLOv9Loss

IMG, CLASSES, R = 64, 2, 8


def synthetic(gen: torch.Generator, n_images: int) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Images with 1-3 filled rectangles; the class is the channel the rectangle is drawn in."""
    images = torch.zeros(n_images, 3, IMG, IMG)
    gts = []
    for i in range(n_images):
        n = int(torch.randint(1, 4, (1,), generator=gen))
        wh = torch.rand(n, 2, generator=gen) * 28 + 10
        xy = torch.rand(n, 2, generator=gen) * (IMG - wh)
        boxes = torch.cat((xy, xy + wh), 1).round()
        labels = torch.randint(0, CLASSES, (n,), generator=gen)
        for (x1, y1, x2, y2), c in zip(boxes.int().tolist(), labels.tolist()):
            images[i, c, y1:y2, x1:x2] = 1.0
            images[i, 2, y1:y2, x1:x2] = 1.0
        gts.append({"boxes": boxes, "labels": labels})
    return images, gts


class TinyDetector(nn.Module):
    """Two levels (strides 8 and 16), a shared head of ``4 R + C`` channels."""

    def __init__(self, width: int = 24) -> None:
        super().__init__()
        act = nn.SiLU
        self.stride8 = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1), act(), nn.Conv2d(width, width, 3, 2, 1), act(),
            nn.Conv2d(width, width, 3, 2, 1), act(),
        )  # fmt: skip
        self.stride16 = nn.Sequential(nn.Conv2d(width, width, 3, 2, 1), act())
        self.head = nn.Sequential(
            nn.Conv2d(width, width, 3, 1, 1), act(), nn.Conv2d(width, 4 * R + CLASSES, 1)
        )
        nn.init.constant_(self.head[-1].bias[4 * R :], -math.log(99.0))  # prior-probability init

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        p8 = self.stride8(x)
        return [self.head(p8), self.head(self.stride16(p8))]


def box_quality(model: TinyDetector, crit: YOLOv9Loss, images: torch.Tensor, gts: list) -> float:
    """Mean IoU of the decoded boxes of the assigned anchors with their ground truths."""
    from torchvision.ops import box_iou

    with torch.no_grad():
        levels = model(images)
        a = crit.assign({"pred": levels}, {"gt": gts, "img_size": IMG})
        boxes = []
        for p in levels:
            b, _, h, w = p.shape
            s = IMG // w
            d = (
                p[:, : 4 * R].reshape(b, 4, R, h * w).softmax(2)
                * torch.arange(R.__float__()).view(1, 1, R, 1)
            ).sum(2)
            ys, xs = torch.meshgrid(torch.arange(h) * s + s // 2, torch.arange(w) * s + s // 2, indexing="ij")
            cx, cy = xs.flatten().float(), ys.flatten().float()
            boxes.append(
                torch.stack((cx - d[:, 0] * s, cy - d[:, 1] * s, cx + d[:, 2] * s, cy + d[:, 3] * s), -1)
            )
        pred = torch.cat(boxes, 1)
        ious = [
            box_iou(pred[i][a.fg_mask[i]], g["boxes"])[
                torch.arange(int(a.fg_mask[i].sum())), a.matched_gt[i][a.fg_mask[i]]
            ]
            for i, g in enumerate(gts)
        ]
    return float(torch.cat(ious).mean())


def test_tiny_detector_boxes_move_onto_the_ground_truths() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    images, gts = synthetic(gen, 48)
    model = TinyDetector()
    crit = YOLOv9Loss(reg_max=R)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    before = box_quality(model, crit, images[:16], gts[:16])
    losses = []
    for _ in range(150):
        idx = torch.randint(0, len(gts), (8,), generator=gen)
        terms = crit({"pred": model(images[idx])}, {"gt": [gts[int(i)] for i in idx], "img_size": IMG})
        loss = sum(terms.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    after = box_quality(model, crit, images[:16], gts[:16])
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-20:]) / 20 <= 0.5 * sum(losses[:20]) / 20, (losses[:5], losses[-5:])
    assert after >= before + 0.25 and after > 0.5, (before, after)


def test_ddp_gradients_equal_single_process_on_the_whole_batch() -> None:
    from yolov9_cases import boxes

    gen = torch.Generator().manual_seed(3)
    feats = head_features(4, 64, seed=3)
    gt = [boxes(n, (64, 64), 3, gen=gen, min_size=10) for n in (0, 0, 9, 6)]  # rank 0: no boxes at all
    whole = {"gt": gt, "img_size": 64}
    halves = [([f[sl] for f in feats], {"gt": gt[sl], "img_size": 64}) for sl in (slice(0, 2), slice(2, 4))]
    ranks = run_on_ranks(ddp_rank, world_size=2, args=(halves,))
    want = shared_head_grads(feats, whole, normalize=False)
    for r in ranks:  # on: the averaged gradients are those of one process on the whole batch
        for got, w in zip(r[True], want):
            torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-6)
    # off (NetsPresso): each rank divides by its own normaliser (rank 0 by 1), which differs
    assert max(float((g - w).abs().max()) for g, w in zip(ranks[0][False], want)) > 1e-3
