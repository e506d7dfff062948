# SPDX-License-Identifier: Apache-2.0
"""A tiny detector trained with yolox_loss on synthetic rectangles: the loss falls by at least half."""

from __future__ import annotations

import math

import torch
from torch import nn

from losskit_detection_yolox import YOLOXLoss

IMG, CLASSES = 64, 2


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
    """Two levels (strides 8 and 16) with a small decoupled-free head: ``[tx, ty, tw, th, obj, cls...]``."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        act = nn.SiLU
        self.stride8 = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1),
            act(),
            nn.Conv2d(width, width, 3, 2, 1),
            act(),
            nn.Conv2d(width, width, 3, 2, 1),
            act(),
        )
        self.stride16 = nn.Sequential(nn.Conv2d(width, width, 3, 2, 1), act())
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, 1, 1), act(), nn.Conv2d(width, 5 + CLASSES, 1))
            for _ in range(2)
        )
        for head in self.heads:  # YOLOX's prior-probability init of the obj/cls biases
            nn.init.constant_(head[-1].bias[4:], -math.log(99.0))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        p8 = self.stride8(x)
        return [self.heads[0](p8), self.heads[1](self.stride16(p8))]


def test_tiny_detector_loss_falls_by_half() -> None:
    train()  # one intra-op thread (tests/conftest.py): small convolutions only contend on a shared machine


def train() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    images, gts = synthetic(gen, 64)
    model = TinyDetector()
    crit = YOLOXLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(400):
        idx = torch.randint(0, len(gts), (8,), generator=gen)
        terms = crit({"pred": model(images[idx])}, {"gt": [gts[int(i)] for i in idx], "img_size": IMG})
        loss = terms.total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert all(math.isfinite(v) for v in losses)
    assert last <= 0.5 * first, (first, last)
