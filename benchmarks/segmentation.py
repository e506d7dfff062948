# SPDX-License-Identifier: Apache-2.0
"""Benchmark: losskit's ``seg_cross_entropy`` against NetsPresso Trainer's computation of the same loss.

The reference (``reference_loss`` below) is what NetsPresso Trainer's ``SegCrossEntropyLoss`` runs:
``F.interpolate`` of the logits to label size (bilinear, ``align_corners=False``), then
``F.cross_entropy`` with ``ignore_index`` (and ``weight`` / ``label_smoothing`` in the rows that set
them). Both run in this process on the same inputs; their values are compared as a sanity check.

Timing: forward + backward (``loss.backward()``), after one warm-up call; the two implementations
alternate, each is run ``--repeats`` times and the median is reported, using ``torch.get_num_threads()``
CPU threads (``--threads N`` to change; or the GPU, synchronised, with ``--device cuda``).

Peak extra memory: the highest amount of tensor memory allocated during one forward + backward beyond
what was allocated before it (inputs and labels excluded; the gradient written into the logits' ``.grad``
included), measured as ``benchmarks/segmentation_pidnet.py`` does: on CPU the peak of the running sum of
the PyTorch profiler's allocator records (``profile_memory=True``), on CUDA
``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` around the call.

Run: ``flock /tmp/losskit-bench.lock python benchmarks/segmentation.py`` (about a minute on two CPU
cores). ``--quick`` runs the main case only with 3 repeats.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from losskit_segmentation import SegCrossEntropy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from segmentation_pidnet import peak_extra_bytes

IGNORE = 255


def reference_loss(
    pred: torch.Tensor,
    labels: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """NetsPresso Trainer's segmentation cross-entropy: upsample, then ``F.cross_entropy``."""
    up = F.interpolate(pred, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(up, labels, weight=weight, ignore_index=IGNORE, label_smoothing=label_smoothing)


def make_inputs(
    batch: int, classes: int, h: int, w: int, height: int, width: int, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded logits and Cityscapes-like labels: blocky classes, a padded strip of ignored pixels."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, classes, (batch, 1, height // 32 + 1, width // 32 + 1), generator=g).float()
    labels = F.interpolate(coarse, size=(height, width), mode="nearest")[:, 0].long()
    labels[:, -height // 16 :] = IGNORE
    pred = torch.randn(batch, classes, h, w, generator=g)
    return pred.to(device).requires_grad_(), labels.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(fn: Callable[[], torch.Tensor], pred: torch.Tensor) -> float:
    pred.grad = None
    loss = fn()
    loss.backward()
    return float(loss.detach())


def run_case(
    label: str, shape: tuple[int, ...], fields: dict[str, Any], *, repeats: int, device: torch.device
) -> dict[str, Any]:
    pred, labels = make_inputs(*shape, device=device)
    crit = SegCrossEntropy(**fields).to(device)
    weight = crit.class_weights.float() if crit.class_weights is not None else None
    smoothing = float(fields.get("label_smoothing", 0.0))
    impls: dict[str, Callable[[], torch.Tensor]] = {
        "reference": lambda: reference_loss(pred, labels, weight=weight, label_smoothing=smoothing),
        "losskit": lambda: crit({"pred": pred}, {"target": labels}),
    }
    values = {name: _step(fn, pred) for name, fn in impls.items()}  # warm-up and value check
    times: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(repeats):
        for name, fn in impls.items():
            _sync(device)
            t0 = time.perf_counter()
            _step(fn, pred)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    memory = {}
    for name, fn in impls.items():
        pred.grad = None  # outside the measured region: the free of the earlier gradient is not counted
        memory[name] = peak_extra_bytes(lambda fn=fn: fn().backward(), device)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {
        "case": label,
        "ref_ms": 1e3 * med["reference"],
        "losskit_ms": 1e3 * med["losskit"],
        "speedup": med["reference"] / med["losskit"],
        "ref_mib": memory["reference"] / 2**20,
        "losskit_mib": memory["losskit"] / 2**20,
        "mem_ratio": memory["losskit"] / max(memory["reference"], 1),
        "rel_diff": abs(values["losskit"] - values["reference"]) / max(abs(values["reference"]), 1e-12),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="main case only, 3 repeats")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    main_case = (8, 19, 128, 256, 512, 1024)
    weights = {"class_weights": [1.0 + 0.1 * c for c in range(19)]}
    cases: list[tuple[str, tuple[int, ...], dict[str, Any]]] = [
        ("B=8 C=19 128x256 -> 512x1024", main_case, {})
    ]
    if not args.quick:
        cases += [
            ("same, class weights + label_smoothing 0.1", main_case, {**weights, "label_smoothing": 0.1}),
            ("B=2 C=19 63x94 -> 500x750", (2, 19, 63, 94, 500, 750), {}),
            ("B=2 C=19 512x1024 -> 512x1024 (no resize)", (2, 19, 512, 1024, 512, 1024), {}),
        ]
    repeats = 3 if args.quick else args.repeats
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, repeats {repeats}")
    print(
        "| case | reference fwd+bwd (ms) | losskit fwd+bwd (ms) | speed-up | reference peak extra (MiB) "
        "| losskit peak extra (MiB) | memory ratio | rel. diff of loss |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, shape, fields in cases:
        r = run_case(label, shape, fields, repeats=repeats, device=device)
        print(
            f"| {r['case']} | {r['ref_ms']:.0f} | {r['losskit_ms']:.0f} | {r['speedup']:.2f}x "
            f"| {r['ref_mib']:.0f} | {r['losskit_mib']:.0f} | {r['mem_ratio']:.2f} | {r['rel_diff']:.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
