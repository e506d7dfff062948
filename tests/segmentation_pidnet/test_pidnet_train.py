# SPDX-License-Identifier: Apache-2.0
"""A tiny PIDNet-shaped model trained on synthetic shapes: the loss falls by at least half."""

from __future__ import annotations

import torch
from torch import nn

from losskit_segmentation_pidnet import PIDNetLoss

CLASSES, SIZE = 3, 32


def _batch(g: torch.Generator, n: int = 8):
    """Images with a bright square (class 1) and a dark disc (class 2) on noise; boundaries from labels."""
    labels = torch.zeros(n, SIZE, SIZE, dtype=torch.int64)
    images = 0.1 * torch.randn(n, 3, SIZE, SIZE, generator=g)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    for i in range(n):
        y, x = torch.randint(0, SIZE - 12, (2,), generator=g).tolist()
        labels[i, y : y + 12, x : x + 12] = 1
        cy, cx = torch.randint(6, SIZE - 6, (2,), generator=g).tolist()
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 25
        labels[i][disc] = 2
    images[:, 0] += (labels == 1).float()
    images[:, 1] -= (labels == 2).float()
    edge = torch.zeros(n, SIZE, SIZE, dtype=torch.bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[:, :, 1:] |= labels[:, :, 1:] != labels[:, :, :-1]
    labels[:, -2:] = 255  # padding, ignored
    return images, {"target": labels, "bd_gt": edge.float()}


class TinyPIDNet(nn.Module):
    """Stride-4 features with three heads: P (shallow), I (deeper), D (boundary)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU())
        self.deep = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1), nn.ReLU())
        self.p, self.i, self.d = (
            nn.Conv2d(16, CLASSES, 1),
            nn.Conv2d(16, CLASSES, 1),
            nn.Conv2d(16, 1, 3, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.stem(x)
        deep = self.deep(f)
        return {"pred": self.i(deep), "extra_p": self.p(f), "extra_d": self.d(deep)}


def test_training_halves_the_loss():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = TinyPIDNet()
    criterion = PIDNetLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses, first_boundary_ce = [], None
    for _ in range(100):
        images, target = _batch(g)
        terms = criterion(model(images), target)
        if first_boundary_ce is None:
            first_boundary_ce = terms["boundary_ce"].detach()
        loss = terms.total
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    # At the start no boundary logit passes 0.8: the reference's NaN, here an empty term.
    assert first_boundary_ce == 0
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert last <= 0.5 * first, (first, last)
