# SPDX-License-Identifier: Apache-2.0
"""Seeded RT-DETR batches for the parity tests: continuous random values, so cost ties have
probability zero."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from losskit_detection_detr._example import make_example


def leaves(out: dict[str, Any]) -> list[torch.Tensor]:
    """Every model output of ``out`` that requires grad, in a fixed order."""
    found = [out["pred"]]
    for key in ("aux_pred", "dn_aux_pred"):
        for item in out.get(key) or []:
            found += [item["pred_logits"], item["pred_boxes"]]
    return found


def case(
    counts: Sequence[int],
    *,
    queries: int = 30,
    classes: int = 5,
    logits: int | None = None,
    layers: int = 3,
    num_denoising: int = 12,
    img: int | tuple[int, int] = 64,
    aux: bool = True,
    dn: bool = True,
    zero_area: int = 0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A batch with ``counts[i]`` gts in image i; ``zero_area`` boxes per image get x2 = x1."""
    gen = torch.Generator().manual_seed(seed)
    side = img if isinstance(img, int) else max(img)
    out, target = make_example(
        len(counts),
        queries=queries,
        classes=classes,
        logits=logits or classes,
        layers=layers,
        num_denoising=num_denoising if dn else 0,
        img=side,
        generator=gen,
        counts=counts,
    )
    if not isinstance(img, int):
        target["img_size"] = img
    for g in target["gt"]:
        k = min(zero_area, g["boxes"].shape[0])
        g["boxes"][:k, 2] = g["boxes"][:k, 0]
    if not aux:
        out["aux_pred"] = None
    if dtype != torch.float32:
        for t in leaves(out):
            t.data = t.data.to(dtype)
    return out, target
