# SPDX-License-Identifier: Apache-2.0
"""Data parallel: two gloo ranks with normalize_across_ranks equal one process on the whole batch."""

from __future__ import annotations

import torch
from seg_cases import IGNORE, ddp_worker, tiny_head

from losskit.testing import run_on_ranks
from losskit_segmentation import SegCrossEntropy

CLASSES = 3
WEIGHTS = [1.0, 2.5, 0.5]


def _global_batch():
    g = torch.Generator().manual_seed(0)
    features = 3.0 * torch.randn(4, 3, 5, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (4, 20, 24), generator=g)
    labels[2:][torch.rand(2, 20, 24, generator=g) < 0.8] = IGNORE  # rank 1: few valid pixels
    return features, labels


def test_global_normalisation_matches_single_process():
    features, labels = _global_batch()
    ranks = run_on_ranks(ddp_worker, world_size=2, args=(features, labels, CLASSES, WEIGHTS))

    model = tiny_head(CLASSES)
    crit = SegCrossEntropy(class_weights=WEIGHTS, label_smoothing=0.1)
    crit({"pred": model(features)}, {"target": labels}).backward()
    single = {name: p.grad for name, p in model.named_parameters()}

    worst_on = max(float((g - single[n]).abs().max()) for r in ranks for n, g in r[True].items())
    worst_off = max(float((g - single[n]).abs().max()) for r in ranks for n, g in r[False].items())
    print(f"max |grad difference|: normalize_across_ranks on {worst_on:.2e}, off {worst_off:.2e}")
    assert worst_on <= 1e-12, worst_on
    # Off (the default, NetsPresso's behaviour): each rank divides by its own weight sum, so the rank with
    # few valid pixels weighs them more and the averaged gradient is not the global-batch one.
    assert worst_off > 1e-3, worst_off
