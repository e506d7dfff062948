# SPDX-License-Identifier: Apache-2.0
"""Two gloo ranks, one of them without any gt: same keys on both (no hang), and with
``normalize_across_ranks`` the DDP-averaged loss and gradients equal one process on the whole batch."""

from __future__ import annotations

from typing import Any

import torch
from detr_cases import case, leaves

from losskit.testing import run_on_ranks
from losskit_detection_detr import DetrLoss

COUNTS = (3, 5, 0, 0)  # rank 0 holds images 0-1, rank 1 images 2-3: no gt at all


def _slice(out: dict[str, Any], target: dict[str, Any], rows: slice) -> tuple[dict[str, Any], dict[str, Any]]:
    part = {
        "pred": out["pred"][rows].detach().requires_grad_(True),
        "aux_pred": [
            {k: v[rows].detach().requires_grad_(True) for k, v in a.items()} for a in out["aux_pred"]
        ],
    }
    return part, {"gt": target["gt"][rows], "img_size": target["img_size"]}


def _rank(rank: int, world: int) -> dict[str, Any]:
    out, target = case(COUNTS, dn=False, seed=9)
    rows = slice(2 * rank, 2 * rank + 2)
    part, part_target = _slice(out, target, rows)
    terms = DetrLoss(normalize_across_ranks=True)(part, part_target)
    total = sum(terms.values())
    grads = torch.autograd.grad(total, leaves(part))
    # denoising outputs only where the rank has gts (the model sends none without): keys still agree
    dn_out, dn_target = case((3, 5) if rank == 0 else (0, 0), seed=10 + rank)
    dn_terms = DetrLoss(normalize_across_ranks=True)(dn_out, dn_target)
    return {
        "terms": {k: v.detach() for k, v in terms.items()},
        "num_boxes": terms.diagnostics["num_boxes"],
        "grads": [g.detach() for g in grads],
        "dn_keys": list(dn_terms),
        "dn_has_outputs": dn_out["dn_aux_pred"] is not None,
    }


def test_ranks_agree_with_one_process_on_the_whole_batch() -> None:
    results = run_on_ranks(_rank, world_size=2)
    out, target = case(COUNTS, dn=False, seed=9)
    whole = DetrLoss()(out, target)
    whole_grads = torch.autograd.grad(sum(whole.values()), leaves(out))
    assert [r["dn_has_outputs"] for r in results] == [True, False]
    assert results[0]["dn_keys"] == results[1]["dn_keys"] == list(DetrLoss.terms)
    assert all(float(r["num_boxes"]) == 4.0 for r in results)  # mean of 8 and 0 gts
    for name in whole:
        mean = (results[0]["terms"][name] + results[1]["terms"][name]) / 2
        torch.testing.assert_close(mean, whole[name].detach(), rtol=1e-5, atol=1e-6)
    for i, g in enumerate(whole_grads):  # DDP averages the ranks' gradients
        averaged = torch.cat([results[0]["grads"][i], results[1]["grads"][i]]) / 2
        torch.testing.assert_close(averaged, g, rtol=1e-4, atol=1e-7)
