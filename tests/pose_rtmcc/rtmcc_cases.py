# SPDX-License-Identifier: Apache-2.0
"""The rank function of the data-parallel test (a module of its own so spawned processes import it)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

SIZE = (12, 10)  # 24 + 20 bins
K = 3


def tiny_head() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, K * 44).double()


def forward(model: nn.Module, features: Tensor) -> Tensor:
    return model(features).view(features.shape[0], K, 44)


def ddp_worker(rank: int, world_size: int, features: Tensor, keypoints: Tensor, split: int) -> dict[str, Any]:
    """Rank 0 takes instances ``[:split]``, rank 1 the rest; gradients come from a real DDP wrapper."""
    from torch.nn.parallel import DistributedDataParallel

    from losskit_pose_rtmcc import RTMCCLoss

    part = slice(0, split) if rank == 0 else slice(split, None)
    result: dict[str, Any] = {}
    for normalizer in ("keypoints", "instances_and_keypoints"):
        for across in (True, False):
            model = DistributedDataParallel(tiny_head())
            crit = RTMCCLoss(
                input_size=SIZE, sigma=(2.0, 1.5), normalizer=normalizer, normalize_across_ranks=across
            )
            terms = crit({"pred": forward(model, features[part])}, {"keypoints": keypoints[part]})
            (terms["x"] + terms["y"]).backward()
            result[f"{normalizer}/{across}"] = {
                "grads": {n: p.grad.detach().clone() for n, p in model.module.named_parameters()},
                "keys": (tuple(terms), tuple(terms.diagnostics)),
            }
    return result
