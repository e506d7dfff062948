# SPDX-License-Identifier: Apache-2.0
"""Data parallel: two gloo ranks with normalize_across_ranks equal one process on the whole batch."""

from __future__ import annotations

import torch
from rtmcc_cases import SIZE, ddp_worker, forward, tiny_head

from losskit.testing import run_on_ranks
from losskit_pose_rtmcc import RTMCCLoss


def test_ddp_gradients_equal_the_single_process_gradients() -> None:
    g = torch.Generator().manual_seed(0)
    features = torch.randn(4, 4, generator=g, dtype=torch.float64)
    xy = torch.rand(4, 3, 2, generator=g, dtype=torch.float64) * torch.tensor(SIZE, dtype=torch.float64)
    vis = torch.tensor([[2.0, 1.0, 0.0], [2.0, 2.0, 1.0], [0.0, 2.0, 2.0], [1.0, 2.0, 0.0]])[..., None]
    keypoints = torch.cat((xy, vis.double()), -1)
    ranks = run_on_ranks(ddp_worker, world_size=2, args=(features, keypoints, 3))  # 3 + 1 instances

    report = []
    for normalizer in ("keypoints", "instances_and_keypoints"):
        model = tiny_head()
        crit = RTMCCLoss(input_size=SIZE, sigma=(2.0, 1.5), normalizer=normalizer)
        terms = crit({"pred": forward(model, features)}, {"keypoints": keypoints})
        (terms["x"] + terms["y"]).backward()
        single = {n: p.grad for n, p in model.named_parameters()}
        worst = {}
        for across in (True, False):
            worst[across] = max(
                float((r[f"{normalizer}/{across}"]["grads"][n] - single[n]).abs().max())
                for r in ranks
                for n in single
            )
        report.append(f"{normalizer}: on {worst[True]:.1e}, off {worst[False]:.1e}")
        assert worst[True] <= 1e-12, worst
        # off (the default, as mmpose and NetsPresso): each rank normalises alone, DDP averages
        assert worst[False] > 1e-3, worst
    print("max |grad difference| " + "; ".join(report))
    assert (
        ranks[0]["keypoints/True"]["keys"]
        == ranks[1]["keypoints/True"]["keys"]
        == (("x", "y"), ("num_weighted",))
    )
