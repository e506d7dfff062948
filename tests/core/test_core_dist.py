# SPDX-License-Identifier: Apache-2.0
"""losskit.dist.global_mean on real gloo ranks, and losskit.testing.run_on_ranks itself."""

from __future__ import annotations

import torch

from losskit.dist import global_mean, is_distributed
from losskit.testing import run_on_ranks


def _ranks(rank: int, world_size: int, counts: list[float]) -> dict[str, torch.Tensor]:
    count = torch.tensor(counts[rank])
    return {
        "on": global_mean(count, enabled=True),
        "off": global_mean(count, enabled=False),
        "raw": global_mean(count, enabled=True, min=None),
        "distributed": torch.tensor(is_distributed()),
    }


def test_global_mean_single_process_is_a_clamp() -> None:
    assert not is_distributed()
    assert global_mean(torch.tensor(0.0), enabled=True).item() == 1.0
    assert global_mean(torch.tensor(7), enabled=True).item() == 7.0
    assert global_mean(torch.tensor(0.25), enabled=False, min=None).item() == 0.25


def test_global_mean_on_two_gloo_ranks() -> None:
    # rank 0 has no foreground at all, rank 1 has 1: the mean (0.5) is clamped after the reduction.
    results = run_on_ranks(_ranks, world_size=2, args=([0.0, 1.0],))
    for rank, res in enumerate(results):
        assert res["distributed"].item() is True
        assert res["raw"].item() == 0.5
        assert res["on"].item() == 1.0
        assert res["off"].item() == max([0.0, 1.0][rank], 1.0)
    results = run_on_ranks(_ranks, world_size=2, args=([3.0, 8.0],))
    assert [r["on"].item() for r in results] == [5.5, 5.5]
