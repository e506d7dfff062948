# SPDX-License-Identifier: Apache-2.0
"""A plain reference for ``rtmcc_loss``, written from the formulas, one keypoint at a time.

Encoding follows mmpose's Gaussian SimCC labels as the issue states them (numpy rounding half to even,
the 3-sigma in-bounds test, visibility weights); the loss is torch's ``F.kl_div`` on rows. Used by the
parity tests only: slow, obvious, independent of the plugin's tables and fused sums.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def reference_encode(
    keypoints: Tensor,
    *,
    input_size: Sequence[int] = (256, 256),
    sigma: Sequence[float] = (5.66, 5.66),
    split_ratio: float = 2.0,
    visibility_weight: str = "raw",
    normalize: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(t_x (N, K, W_x), t_y (N, K, W_y), weight (N, K), centres (N, K, 2))`` as float64 arrays."""
    kp = keypoints.detach().cpu().numpy()  # float32 stays float32: the scaling rounds as the data's dtype
    n_inst, n_kp, _ = kp.shape
    bins = (round(input_size[0] * split_ratio), round(input_size[1] * split_ratio))
    targets = [np.zeros((n_inst, n_kp, b)) for b in bins]
    weight = np.zeros((n_inst, n_kp))
    centres = np.around(kp[..., :2] * kp.dtype.type(split_ratio)).astype(np.float64)
    for n in range(n_inst):
        for k in range(n_kp):
            v = float(kp[n, k, 2])
            if not v >= 0.5:
                continue
            mu = centres[n, k]
            outside = False
            for axis in range(2):
                radius = 3 * sigma[axis]
                if mu[axis] - radius >= bins[axis] or mu[axis] + radius + 1 < 0:
                    outside = True
            if outside:
                continue
            weight[n, k] = v if visibility_weight == "raw" else min(v, 1.0)
            for axis in range(2):
                grid = np.arange(bins[axis], dtype=np.float64)
                t = np.exp(-((grid - mu[axis]) ** 2) / (2 * sigma[axis] ** 2))
                if normalize:
                    t = t / (sigma[axis] * math.sqrt(2 * math.pi))
                targets[axis][n, k] = t
    return targets[0], targets[1], weight, centres


def reference_loss(
    pred: Tensor,
    keypoints: Tensor,
    *,
    input_size: Sequence[int] = (256, 256),
    sigma: Sequence[float] = (5.66, 5.66),
    split_ratio: float = 2.0,
    beta: float = 10.0,
    label_softmax: bool = True,
    label_beta: float = 10.0,
    use_target_weight: bool = True,
    normalize: bool = False,
    visibility_weight: str = "raw",
    normalizer: str = "keypoints",
    mask: Sequence[int] | None = None,
    mask_weight: float = 1.0,
    **_: Any,
) -> dict[str, Tensor]:
    """``{"x", "y", "weight"}``: each axis' weighted KL sum / normaliser, differentiable in ``pred``."""
    t_x, t_y, weight, _centres = reference_encode(
        keypoints,
        input_size=input_size,
        sigma=sigma,
        split_ratio=split_ratio,
        visibility_weight=visibility_weight,
        normalize=normalize,
    )
    n_inst, n_kp, _ = pred.shape
    dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
    w = torch.from_numpy(weight).to(dtype) if use_target_weight else torch.ones(n_inst, n_kp, dtype=dtype)
    for j in mask or ():
        w[:, j] = w[:, j] * mask_weight
    width = t_x.shape[-1]
    result: dict[str, Tensor] = {"weight": w}
    norm = n_kp * (n_inst if normalizer == "instances_and_keypoints" else 1)
    for name, logits, t in (("x", pred[..., :width], t_x), ("y", pred[..., width:], t_y)):
        total = torch.zeros((), dtype=dtype)
        for n in range(n_inst):
            for k in range(n_kp):
                label = torch.from_numpy(t[n, k]).to(dtype)
                q = torch.softmax(label * label_beta, dim=0) if label_softmax else label
                log_p = torch.log_softmax(logits[n, k].to(dtype) * beta, dim=0)
                kl = F.kl_div(log_p, q, reduction="none").mean()
                total = total + w[n, k] * kl
        result[name] = total / norm
    return result
