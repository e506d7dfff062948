# SPDX-License-Identifier: Apache-2.0
"""Data parallel (gloo, 2 CPU ranks): DDP-averaged gradients against one process on the whole batch."""

from __future__ import annotations

import retinanet_cases as tl
import torch

from losskit.testing import run_on_ranks

CONFIGS = [
    {"normalizer": "batch", "normalize_across_ranks": True},
    {"normalizer": "batch", "normalize_across_ranks": False},
    {"normalizer": "image"},
    {"normalizer": "image", "normalize_across_ranks": True},
]


def _half(batch, sl):
    cls, reg, anchors, gt = batch
    return [t.detach()[sl].clone() for t in cls], [t.detach()[sl].clone() for t in reg], anchors, gt[sl]


def test_ddp_gradients_equal_single_process_on_whole_batch():
    # rank 0 holds two images without boxes, rank 1 two crowded ones: very different foreground counts
    whole = tl.make_batch([0, 0, 30, 22], seed=13, crowded=True)
    halves = [_half(whole, slice(0, 2)), _half(whole, slice(2, 4))]
    per_rank = run_on_ranks(tl.ddp_worker, world_size=2, args=(halves, CONFIGS), timeout=90.0)
    for i, cfg in enumerate(CONFIGS):
        single = tl.loss_with_shared_params(whole, cfg)
        r0, r1 = per_rank[0][i], per_rank[1][i]
        # same keys (terms, diagnostics) on both ranks whatever their batch holds
        assert (
            r0[3]
            == r1[3]
            == single[3]
            == (("classification", "bbox_regression"), ("num_fg", "num_ignored", "invalid_targets"))
        )
        # DDP averaging leaves the same gradient on both ranks
        assert torch.equal(r0[1], r1[1]) and torch.equal(r0[2], r1[2])
        diff_c = tl.rel_diff(r0[1], single[1])
        diff_r = tl.rel_diff(r0[2], single[2])
        if cfg == {"normalizer": "batch", "normalize_across_ranks": False}:
            # each rank divides by its own count (rank 0: max(1, 0) = 1): not the whole-batch gradient
            assert diff_c > 1e-2, diff_c
        else:
            # per-image normalisation is rank-invariant by itself; the batch one needs the all-reduce
            assert diff_c <= 1e-5 and diff_r <= 1e-5, (cfg, diff_c, diff_r)
