# SPDX-License-Identifier: Apache-2.0
"""Benchmark: losskit's batched ``yolov9_loss`` against a faithful per-image reference.

The baseline is ``tests/detection_yolov9/yolov9_reference.py`` (the reference the parity tests compare
with), which follows NetsPresso Trainer's ``YOLOv9Loss`` (YOLO at 5c767f2) one image at a time in
the matcher: every anchor decoded with gradient, dense ``(n, A)`` matrices per image, dense one-hot
``(B, A, C)`` soft targets, BCE over all of them, the CIoU of the foreground through the pairwise
matrix's diagonal, ``max(sum, 1)`` read on the host. Both run in this process on the same seeded
inputs: B=8, 640x640 input (8400 anchors, strides 8/16/32), R=16, C=80 (class logits around -2,
bin logits falling by 0.4 per bin), boxes 8-300 pixels wide, and

* ``coco``: boxes per image 12, 4, 20, 7, 50, 1, 0, 2 (mean 12, one image at 50, one empty);
* ``crowded``: 80-120 boxes per image (mean 100);
* ``crowd500``: one image (B=1) with 500 boxes.

Times are medians over repeated runs (after one warm-up) of the forward pass (loss value, graph
built) and of forward plus backward. Peak extra memory is the largest amount of CPU memory allocated
by torch during one forward plus backward, above what was allocated before it (profiler memory
events); it includes the gradients of the head outputs (about 44 MB at B=8), which both sides make.

Run: ``flock /tmp/losskit-bench.lock python benchmarks/detection_yolov9.py [--threads 1] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from losskit_detection_yolov9 import YOLOv9Loss

HELPERS = Path(__file__).resolve().parents[1] / "tests" / "detection_yolov9"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, HELPERS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


cases = _load("yolov9_cases")
reference = _load("yolov9_reference")

SETTINGS: dict[str, list[int]] = {
    "coco": [12, 4, 20, 7, 50, 1, 0, 2],
    "crowded": [100, 80, 120, 90, 110, 95, 105, 100],
    "crowd500": [500],
}
BASELINE = "per-image reference"
Loss = Callable[[list[torch.Tensor]], torch.Tensor]


def implementations(target: dict[str, Any], num_classes: int) -> dict[str, Loss]:
    ref = reference.ReferenceYOLOv9(num_classes)
    crit = YOLOv9Loss()

    def baseline(pred: list[torch.Tensor]) -> torch.Tensor:
        terms, _ = ref(pred, target["gt"], target["img_size"])
        return terms["cls"] + terms["iou"] + terms["dfl"]

    return {BASELINE: baseline, "losskit": lambda pred: crit({"pred": pred}, target).total}


def leaves(levels: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_(True) for p in levels]


def timed(fn: Loss, levels: list[torch.Tensor], reps: int, backward: bool) -> float:
    times = []
    for i in range(reps + 1):
        pred = leaves(levels)
        start = time.perf_counter()
        loss = fn(pred)
        if backward:
            loss.backward()
        elapsed = time.perf_counter() - start
        if i:  # the first run is a warm-up
            times.append(elapsed)
    return statistics.median(times)


def peak(fn: Loss, levels: list[torch.Tensor]) -> int:
    pred = leaves(levels)
    return cases.peak_memory(lambda: fn(pred).backward())


def parity(levels: list[torch.Tensor], target: dict[str, Any], num_classes: int) -> tuple[float, bool]:
    """Largest relative difference of the three terms, and whether the assignments are identical."""
    want, matches = reference.ReferenceYOLOv9(num_classes)(leaves(levels), target["gt"], target["img_size"])
    crit = YOLOv9Loss()
    got = crit({"pred": leaves(levels)}, target)
    worst = max(
        abs(float(got[k].detach()) - float(want[k].detach())) / max(abs(float(want[k].detach())), 1e-12)
        for k in want
    )
    a = crit.assign({"pred": levels}, target)
    same = torch.equal(a.fg_mask, torch.stack([m.fg for m in matches])) and torch.equal(
        a.matched_gt, torch.stack([m.matched for m in matches])
    )
    return worst, same


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1: stable numbers)"
    )
    parser.add_argument(
        "--repeats", "--reps", type=int, default=5, help="timed runs per measurement (after one warm-up)"
    )
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    num_classes = 80
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"threads={args.threads}, repeats={args.repeats}"
    )
    print()
    print(
        "| setting | implementation | fwd ms | fwd+bwd ms | peak extra MiB | speed-up fwd | speed-up fwd+bwd | memory vs reference |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    notes = []
    for name in args.settings:
        counts = SETTINGS[name]
        levels, gt, img = cases.case(
            counts, img=(640, 640), num_classes=num_classes, seed=0, min_size=8, max_size=300, cls_bias=-2.0
        )
        levels = [p.detach() for p in levels]
        target = {"gt": gt, "img_size": img}
        worst, same = parity(levels, target, num_classes)
        notes.append(f"{name}: identical assignment: {same}; largest relative term difference {worst:.1e}")
        rows = {}
        for label, fn in implementations(target, num_classes).items():
            rows[label] = (
                timed(fn, levels, args.repeats, False),
                timed(fn, levels, args.repeats, True),
                peak(fn, levels),
            )
        base = rows[BASELINE]
        for label, (fwd, both, mem) in rows.items():
            ratio = ("", "", "")
            if label != BASELINE:
                ratio = (f"{base[0] / fwd:.1f}x", f"{base[1] / both:.1f}x", f"{mem / base[2]:.2f}x")
            print(
                f"| {name} | {label} | {fwd * 1e3:.1f} | {both * 1e3:.1f} | {mem / 2**20:.1f} | "
                f"{ratio[0]} | {ratio[1]} | {ratio[2]} |"
            )
    print()
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
