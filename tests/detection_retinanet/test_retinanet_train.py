# SPDX-License-Identifier: Apache-2.0
"""A tiny RetinaNet-style model trained on synthetic boxes: the loss falls by at least half."""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from losskit_detection_retinanet import RetinaNetLoss

NUM_CLASSES = 3
IMAGE = 64


def _dataset(n: int, g: torch.Generator) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Images with 1-2 filled rectangles; the rectangle's class decides which channel lights up."""
    images = 0.05 * torch.randn(n, 3, IMAGE, IMAGE, generator=g)
    targets = []
    for i in range(n):
        k = int(torch.randint(1, 3, (1,), generator=g))
        wh = 12 + torch.randint(0, 20, (k, 2), generator=g)
        xy = torch.stack(
            [torch.randint(0, int(IMAGE - w) + 1, (1,), generator=g)[0] for w in wh.flatten()]
        ).view(k, 2)
        boxes = torch.cat([xy, xy + wh], 1).float()
        labels = torch.randint(0, NUM_CLASSES, (k,), generator=g)
        for (x1, y1, x2, y2), c in zip(boxes.long().tolist(), labels.tolist()):
            images[i, c, y1:y2, x1:x2] += 1.0
        targets.append({"boxes": boxes, "labels": labels})
    return images, targets


class TinyRetina(nn.Module):
    def __init__(self, num_anchors: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, 2, 1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, 2, 1),
            nn.ReLU(),
        )
        self.down = nn.Sequential(nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU())
        self.cls = nn.Conv2d(32, num_anchors * NUM_CLASSES, 3, 1, 1)
        self.reg = nn.Conv2d(32, num_anchors * 4, 3, 1, 1)
        self.num_anchors = num_anchors
        nn.init.normal_(self.cls.weight, std=0.01)
        nn.init.constant_(self.cls.bias, -math.log(99.0))  # prior probability 0.01, as RetinaNet
        nn.init.normal_(self.reg.weight, std=0.01)
        nn.init.zeros_(self.reg.bias)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        f1 = self.stem(x)
        feats = [f1, self.down(f1)]
        cls, reg = [], []
        for f in feats:
            n, _, h, w = f.shape
            cls.append(
                self.cls(f)
                .view(n, self.num_anchors, NUM_CLASSES, h, w)
                .permute(0, 3, 4, 1, 2)
                .reshape(n, -1, NUM_CLASSES)
            )
            reg.append(
                self.reg(f).view(n, self.num_anchors, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
            )
        return cls, reg, feats


def test_tiny_training_run_halves_the_loss():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    images, targets = _dataset(6, g)
    gen = AnchorGenerator(((16, 24), (32, 48)), ((0.5, 1.0, 2.0),) * 2)
    model = TinyRetina(gen.num_anchors_per_location()[0])
    with torch.no_grad():
        feats = model(images)[2]
    anchors = gen(ImageList(images, [(IMAGE, IMAGE)] * len(images)), feats)[0]
    crit = RetinaNetLoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    history = []
    for _ in range(30):
        cls, reg, _ = model(images)
        res = crit({"cls_logits": cls, "bbox_regression": reg, "anchors": anchors}, {"gt": targets})
        loss = res.total
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in history)
    start, end = history[0], sum(history[-5:]) / 5
    assert end <= 0.5 * start, (start, end, history[::10])
