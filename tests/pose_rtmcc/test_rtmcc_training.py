# SPDX-License-Identifier: Apache-2.0
"""A tiny head trained with rtmcc_loss on synthetic blobs: its SimCC argmax converges to the keypoints."""

from __future__ import annotations

import torch
from torch import nn

from losskit_pose_rtmcc import RTMCCLoss, simcc_bins

SIZE, K, RATIO = (16, 12), 2, 2.0


def images(keypoints: torch.Tensor) -> torch.Tensor:
    """One channel per keypoint with a Gaussian blob (sigma 1 px) at its position: ``(N, K, h, w)``."""
    ys = torch.arange(SIZE[1], dtype=torch.float32)[:, None]
    xs = torch.arange(SIZE[0], dtype=torch.float32)[None, :]
    dx = xs - keypoints[..., 0, None, None]
    dy = ys - keypoints[..., 1, None, None]
    return torch.exp(-(dx.square() + dy.square()) / 2.0)


def sample(gen: torch.Generator, n: int) -> torch.Tensor:
    xy = torch.rand(n, K, 2, generator=gen) * (torch.tensor(SIZE, dtype=torch.float32) - 1)
    return torch.cat((xy, torch.full((n, K, 1), 2.0)), -1)


def decode(pred: torch.Tensor) -> torch.Tensor:
    """SimCC argmax of each axis, back in pixels: ``(N, K, 2)``."""
    wx, _ = simcc_bins(SIZE, RATIO)
    return torch.stack((pred[..., :wx].argmax(-1), pred[..., wx:].argmax(-1)), -1).float() / RATIO


def test_simcc_argmax_converges_to_the_keypoints() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        wx, wy = simcc_bins(SIZE, RATIO)
        model = nn.Sequential(
            nn.Flatten(), nn.Linear(K * SIZE[0] * SIZE[1], 128), nn.ReLU(), nn.Linear(128, K * (wx + wy))
        )
        crit = RTMCCLoss(input_size=SIZE, sigma=(1.5, 1.5), split_ratio=RATIO)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        test_kp = sample(gen, 64)
        before = (decode(model(images(test_kp)).view(64, K, -1)) - test_kp[..., :2]).abs().mean()
        losses = []
        for _ in range(300):
            kp = sample(gen, 32)
            terms = crit({"pred": model(images(kp)).view(32, K, -1)}, {"keypoints": kp})
            loss = terms["x"] + terms["y"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        with torch.no_grad():
            error = (decode(model(images(test_kp)).view(64, K, -1)) - test_kp[..., :2]).abs()
    finally:
        torch.set_num_threads(threads)
    assert sum(losses[-20:]) < 0.5 * sum(losses[:20]), (losses[:3], losses[-3:])
    # from a few pixels off to within a pixel (0.25 px is the rounding to half-pixel bins)
    assert float(before) > 2.0, float(before)
    assert float(error.mean()) < 0.75 and float(error.max()) < 2.5, (float(error.mean()), float(error.max()))
