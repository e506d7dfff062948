# SPDX-License-Identifier: Apache-2.0
"""RT-DETR-shaped example batches: decoder layers, the encoder's top-k and contrastive denoising groups
laid out as RT-DETR's ``get_contrastive_denoising_training_group`` lays them out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["make_example"]


def _logit(p: Tensor) -> Tensor:
    p = p.clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


def _near(cxcywh: Tensor, spread: float, gen: torch.Generator) -> Tensor:
    """Boxes scattered around ``cxcywh`` (normalised), as sigmoid outputs in (0, 1)."""
    return torch.sigmoid(_logit(cxcywh) + spread * torch.randn(cxcywh.shape, generator=gen))


def _gts(counts: Sequence[int], classes: int, img: int, gen: torch.Generator) -> list[dict[str, Tensor]]:
    gt = []
    for n in counts:
        xy = torch.rand(n, 2, generator=gen) * img * 0.8
        wh = torch.rand(n, 2, generator=gen) * img * 0.3 + img * 0.05
        boxes = torch.cat((xy, (xy + wh).clamp(max=img)), dim=1)
        gt.append({"boxes": boxes, "labels": torch.randint(0, classes, (n,), generator=gen)})
    return gt


def _layer(
    gt_cxcywh: list[Tensor], queries: int, logits: int, spread: float, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """One output set: the first ``n_i`` queries of image i near its gts, the rest anywhere."""
    b = len(gt_cxcywh)
    boxes = torch.sigmoid(torch.randn(b, queries, 4, generator=gen) * 1.5)
    for i, g in enumerate(gt_cxcywh):
        m = min(g.shape[0], queries)
        boxes[i, :m] = _near(g[:m], spread, gen)
    scores = torch.randn(b, queries, logits, generator=gen) - 3.0
    return scores, boxes


def make_example(
    batch_size: int,
    *,
    queries: int,
    classes: int,
    logits: int,
    layers: int,
    num_denoising: int,
    img: int,
    generator: torch.Generator,
    counts: Sequence[int] | None = None,
    max_boxes: int = 5,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(out, target)`` of an RT-DETR head in training mode.

    ``out["pred"]`` is the last of ``layers`` decoder layers; ``out["aux_pred"]`` holds the other
    ``layers - 1`` and the encoder's top-k; ``out["dn_aux_pred"]`` holds ``layers`` denoising layers over
    ``2 * max_n * G`` queries (``G = num_denoising // max_n``, positive queries first in each group), or
    None with ``dn_meta`` when the batch has no gt. Model outputs are leaves that require grad.
    """
    gen = generator
    if counts is None:
        counts = [
            int(torch.randint(1 if i == 0 else 0, max_boxes + 1, (1,), generator=gen))
            for i in range(batch_size)
        ]
    gt = _gts(counts, classes, img, gen)
    cxcywh = []
    for g in gt:
        b = g["boxes"] / img
        cxcywh.append(torch.cat(((b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]), dim=1))

    sets = [_layer(cxcywh, queries, logits, 1.5 - 1.2 * k / max(layers, 1), gen) for k in range(layers + 1)]
    # sets[0] plays the encoder's top-k, sets[1..layers] the decoder layers, the last being out["pred"]
    last_logits, last_boxes = sets[-1]
    pred = torch.cat((last_boxes, last_logits), dim=-1).requires_grad_(True)
    aux = [
        {"pred_logits": s.requires_grad_(True), "pred_boxes": bx.requires_grad_(True)}
        for s, bx in [*sets[1:-1], sets[0]]
    ]
    out: dict[str, Any] = {"pred": pred, "aux_pred": aux, "dn_aux_pred": None, "dn_meta": None}
    max_n = max(counts, default=0)
    if max_n > 0 and num_denoising > 0:
        groups = max(num_denoising // max_n, 1)
        n_dn = 2 * max_n * groups
        positive = tuple(
            torch.tensor([g * 2 * max_n + j for g in range(groups) for j in range(n)], dtype=torch.int64)
            for n in counts
        )
        dn = []
        for k in range(layers):
            spread = 0.8 - 0.6 * k / max(layers, 1)
            boxes = torch.sigmoid(torch.randn(batch_size, n_dn, 4, generator=gen))
            for i, known in enumerate(cxcywh):
                if known.shape[0]:
                    boxes[i, positive[i]] = _near(known.repeat(groups, 1), spread, gen)
            scores = torch.randn(batch_size, n_dn, logits, generator=gen) - 2.0
            dn.append({"pred_logits": scores.requires_grad_(True), "pred_boxes": boxes.requires_grad_(True)})
        out["dn_aux_pred"] = dn
        out["dn_meta"] = {
            "dn_positive_idx": positive,
            "dn_num_group": groups,
            "dn_num_split": [n_dn, queries],
        }
    return out, {"gt": gt, "img_size": img}
