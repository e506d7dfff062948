# SPDX-License-Identifier: Apache-2.0
"""Data parallel (2 gloo ranks on CPU): DDP-averaged gradients against one process on the whole batch.

One spawn runs every case (spawning costs seconds); each criterion has its own test reading it.
"""

from __future__ import annotations

from typing import Any

import classification_cases as tl
import pytest
import torch

from losskit.testing import run_on_ranks
from losskit_classification import CrossEntropy, FocalLoss

D, C = 6, 4


def _ce_case(config: dict[str, Any], ignored0: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(8, D, generator=g)
    target = torch.randint(0, C, (8,), generator=g)
    target[:ignored0] = -100  # rank 0 holds 4 samples, `ignored0` of them ignored; rank 1 none
    return {
        "criterion": "cross_entropy",
        "config": config,
        "weight": torch.randn(D, C, generator=g),
        "whole": (feats, target),
        "halves": [(feats[:4], target[:4]), (feats[4:], target[4:])],
    }


def _focal_case(config: dict[str, Any], split: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(8, D, generator=g)
    target = torch.randint(-1, C, (8,), generator=g)
    return {
        "criterion": "focal_loss",
        "config": config,
        "weight": torch.randn(D, C, generator=g),
        "whole": (feats, target),
        "halves": [(feats[:split], target[:split]), (feats[split:], target[split:])],
    }


CASES = [
    # (case, whether the DDP gradient must equal the whole-batch gradient)
    (_ce_case({"normalize_across_ranks": True}, ignored0=3, seed=0), True),
    (
        _ce_case(
            {"normalize_across_ranks": True, "label_smoothing": 0.1, "class_weights": [1.0, 2.0, 0.5, 1.0]},
            3,
            1,
        ),
        True,
    ),
    (_ce_case({"normalize_across_ranks": True}, ignored0=4, seed=2), True),  # rank 0: everything ignored
    (_ce_case({"normalize_across_ranks": False}, ignored0=3, seed=0), False),  # local counts 1 and 4
    (_ce_case({"normalize_across_ranks": False}, ignored0=0, seed=3), True),  # equal counts: no difference
    (_focal_case({"normalize_across_ranks": True}, split=3, seed=4), True),  # 3 and 5 rows
    (_focal_case({"normalize_across_ranks": False}, split=3, seed=4), False),
    (_focal_case({"normalize_across_ranks": False}, split=4, seed=5), True),  # equal batches: exact
]


@pytest.fixture(scope="module")
def ddp_results() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    cases = [case for case, _ in CASES]
    per_rank = run_on_ranks(tl.ddp_worker, world_size=2, args=(cases,), timeout=90.0)
    out = []
    for i, case in enumerate(cases):
        cls = CrossEntropy if case["criterion"] == "cross_entropy" else FocalLoss
        single = tl.linear_grad(cls(**case["config"]), *case["whole"][:1], case["weight"], case["whole"][1])
        out.append((per_rank[0][i], per_rank[1][i], single))
    return out


def _check(ddp_results, criterion: str) -> list[float]:
    diffs = []
    for (case, exact), (g0, g1, single) in zip(CASES, ddp_results):
        if case["criterion"] != criterion:
            continue
        assert torch.equal(g0, g1)  # the averaged gradient is the same on every rank
        diff = float((g0 - single).abs().max())
        if exact:
            assert diff <= 1e-5, (case["config"], diff)
            diffs.append(diff)
        else:
            assert diff > 1e-3, (case["config"], diff)  # the documented difference without the option
    return diffs


def test_cross_entropy_ddp_matches_whole_batch(ddp_results):
    _check(ddp_results, "cross_entropy")


def test_focal_loss_ddp_matches_whole_batch(ddp_results):
    _check(ddp_results, "focal_loss")
