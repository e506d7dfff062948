# SPDX-License-Identifier: Apache-2.0
"""Data parallel: two gloo ranks with normalize_across_ranks equal one process on the whole batch."""

from __future__ import annotations

import torch
from pidnet_cases import IGNORE, ddp_worker, split_heads, tiny_heads

from losskit.testing import run_on_ranks
from losskit_segmentation_pidnet import PIDNetLoss

CLASSES = 3


def _global_batch():
    g = torch.Generator().manual_seed(0)
    features = 3.0 * torch.randn(4, 3, 5, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (4, 20, 24), generator=g)
    labels[2:][torch.rand(2, 20, 24, generator=g) < 0.8] = IGNORE  # rank 1: few valid pixels
    bd_gt = (torch.rand(4, 20, 24, generator=g) < 0.2).double()
    bd_gt[2:] = 0.0  # rank 1: no boundary pixel at all
    return features, {"target": labels, "bd_gt": bd_gt}


def test_global_normalisation_matches_single_process():
    features, target = _global_batch()
    ranks = run_on_ranks(ddp_worker, world_size=2, args=(features, target, CLASSES))

    model = tiny_heads(CLASSES)
    PIDNetLoss()(split_heads(model(features), CLASSES), target).total.backward()
    single = {name: p.grad for name, p in model.named_parameters()}

    worst_on = worst_off = 0.0
    for result in ranks:
        for name, g in result[True]["grads"].items():
            worst_on = max(worst_on, float((g - single[name]).abs().max()))
        for name, g in result[False]["grads"].items():
            worst_off = max(worst_off, float((g - single[name]).abs().max()))
    print(f"max |grad difference|: normalize_across_ranks on {worst_on:.2e}, off {worst_off:.2e}")
    assert worst_on <= 1e-5, worst_on
    # Off (the default, PIDNet's behaviour under DataParallel): each rank divides by its own counts, so a
    # rank with few valid pixels weighs them more; the averaged gradient is not the global-batch one.
    assert worst_off > 1e-3, worst_off
    # Same keys on every rank whatever its batch holds.
    assert (
        ranks[0][True]["keys"]
        == ranks[1][True]["keys"]
        == (tuple(PIDNetLoss.terms), tuple(PIDNetLoss.diagnostics))
    )
