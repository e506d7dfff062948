# SPDX-License-Identifier: Apache-2.0
"""A tiny SegFormer-shaped model (logits at 1/4) learns a synthetic 3-class mask to >= 90% pixel accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from losskit_segmentation import SegCrossEntropy

CLASSES, SIZE = 3, 32


def _batch(g: torch.Generator, n: int = 8):
    """Images with a bright square (class 1) and a dark disc (class 2) on noise; a padded ignored strip."""
    labels = torch.zeros(n, SIZE, SIZE, dtype=torch.int64)
    images = 0.1 * torch.randn(n, 3, SIZE, SIZE, generator=g)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    for i in range(n):
        y, x = torch.randint(0, SIZE - 12, (2,), generator=g).tolist()
        labels[i, y : y + 12, x : x + 12] = 1
        cy, cx = torch.randint(6, SIZE - 6, (2,), generator=g).tolist()
        labels[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= 25] = 2
    images[:, 0] += (labels == 1).float()
    images[:, 1] -= (labels == 2).float()
    labels[:, -2:] = 255
    return images, labels


class TinySeg(nn.Module):
    """Two stride-2 convolutions and a 1x1 classifier: logits at 1/4 of the input, as SegFormer's head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, 2, 1),
            nn.ReLU(),
            nn.Conv2d(16, CLASSES, 1),
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pred": self.body(x)}


def test_training_reaches_90_percent_pixel_accuracy():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = TinySeg()
    criterion = SegCrossEntropy(label_smoothing=0.05)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        images, labels = _batch(g)
        loss = criterion(model(images), {"target": labels})
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    images, labels = _batch(torch.Generator().manual_seed(123), n=16)
    with torch.no_grad():
        logits = model(images)["pred"]
        up = F.interpolate(logits, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    valid = labels != 255
    accuracy = float((up.argmax(1) == labels)[valid].float().mean())
    print(f"pixel accuracy {accuracy:.3f}")
    assert accuracy >= 0.9, accuracy
