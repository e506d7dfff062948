# SPDX-License-Identifier: Apache-2.0
"""Benchmark: losskit's batched ``yolox_loss`` and ``yolofastest_loss`` against per-image loops.

The baseline is ``tests/detection_yolox/yolox_reference.py`` (the reference the parity tests compare
with): a Python loop over images, a ``(num_gt, candidates, C)`` class cost and a Python loop over
ground truths, as in YOLOX's ``yolo_head.py``. Both run in this process on the same seeded inputs:

* ``coco``: B=8, 640x640 input (8400 anchors, strides 8/16/32), C=80, boxes per image
  12, 4, 20, 7, 50, 1, 0, 2 (mean 12, max 50);
* ``crowded``: the same with 80-120 boxes per image (mean 100);
* ``crowd500``: one image with 500 boxes (losskit only; the baseline's ``500 x 8400 x 80`` class cost
  alone would take about 1.3 GB per copy).
* ``fastest``: ``yolofastest_loss`` (YOLO-Fastest-v2 head): B=8, 352x352 input, 2 levels (22x22 and
  11x11, strides 16/32) x 3 anchors (NetsPresso's v2 anchors; 1815 anchors), C=80, the boxes per image
  of ``coco``. Its baseline is ``tests/detection_yolox/yolofastest_reference.py``, written like
  NetsPresso Trainer's ``YOLOFastestLoss`` (a subclass of the YOLOX-structured loop above: the same
  per-image loop with its host reads, only the decode changes). No L1 term in either.

Times are medians over repeated runs (after one warm-up) of the forward pass (loss value, graph built)
and of forward plus backward. Peak extra memory is the largest amount of CPU memory allocated by torch
during one forward plus backward, above what was allocated before it (from the profiler's memory
events). ``losskit`` sizes the candidate tensors exactly (``candidate_slots="exact"``, the CPU
default); ``losskit static`` uses the bound known on the host (the accelerator default, no sync).
The L1 term of ``yolox_loss`` is on (all four terms computed).

Run: ``flock /tmp/losskit-bench.lock python benchmarks/detection_yolox.py [--threads 1] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from losskit_detection_yolox import YOLOFastestLoss, YOLOXLoss

HELPERS = Path(__file__).resolve().parents[1] / "tests" / "detection_yolox"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, HELPERS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


cases = _load("yolox_cases")
reference = _load("yolox_reference")
fastest_cases = _load("yolofastest_cases")
fastest_reference = _load("yolofastest_reference")

SETTINGS: dict[str, dict[str, Any]] = {
    "coco": {"counts": [12, 4, 20, 7, 50, 1, 0, 2]},
    "crowded": {"counts": [100, 80, 120, 90, 110, 95, 105, 100]},
    "crowd500": {"counts": [500], "baseline": False},
    "fastest": {"counts": [12, 4, 20, 7, 50, 1, 0, 2], "head": "yolofastest"},
}
LOOPS = {"yolox": "YOLOX-structured loop", "yolofastest": "NetsPresso-structured loop"}

Loss = Callable[[list[torch.Tensor]], torch.Tensor]


def fastest_implementations(target: dict[str, Any], num_classes: int) -> dict[str, Loss]:
    """``yolofastest_loss`` and its NetsPresso-structured per-image reference (no L1 term in either)."""
    anchors = fastest_cases.V2_ANCHORS
    ref = fastest_reference.ReferenceYOLOFastest(num_classes, anchors)
    exact = YOLOFastestLoss(anchors=anchors, candidate_slots="exact")
    static = YOLOFastestLoss(anchors=anchors, candidate_slots="static")

    def baseline(pred: list[torch.Tensor]) -> torch.Tensor:
        terms, _ = ref(pred, target["gt"], target["img_size"])
        return terms["iou"] + terms["obj"] + terms["cls"]

    return {
        LOOPS["yolofastest"]: baseline,
        "losskit": lambda pred: _sum(exact({"pred": pred}, target)),
        "losskit static": lambda pred: _sum(static({"pred": pred}, target)),
    }


def _sum(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    return terms["iou"] + terms["obj"] + terms["cls"]


def implementations(target: dict[str, Any], num_classes: int) -> dict[str, Loss]:
    ref = reference.ReferenceYOLOX(num_classes, use_l1=True)
    exact = YOLOXLoss(candidate_slots="exact", l1_activate_epoch=0)
    static = YOLOXLoss(candidate_slots="static", l1_activate_epoch=0)

    def baseline(pred: list[torch.Tensor]) -> torch.Tensor:
        terms, _ = ref(pred, target["gt"], target["img_size"])
        return terms["iou"] + terms["obj"] + terms["cls"] + terms["l1"]

    return {
        "YOLOX-structured loop": baseline,
        "losskit": lambda pred: exact({"pred": pred}, target).total,
        "losskit static": lambda pred: static({"pred": pred}, target).total,
    }


def leaves(out: dict[str, Any]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_(True) for p in out["pred"]]


def timed(fn: Loss, out: dict[str, Any], reps: int, backward: bool) -> float:
    times = []
    for i in range(reps + 1):
        pred = leaves(out)
        start = time.perf_counter()
        loss = fn(pred)
        if backward:
            loss.backward()
        elapsed = time.perf_counter() - start
        if i:  # the first run is a warm-up
            times.append(elapsed)
    return statistics.median(times)


def peak_memory(fn: Loss, out: dict[str, Any]) -> int:
    """Bytes: the peak of torch's CPU allocations during one forward + backward, above the start."""
    pred = leaves(out)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(pred).backward()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]"]
    if not memory:
        return 0
    # "Total Allocated" keeps counting across profiler sessions: measure from the first event's level
    start = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(0, *(m["Total Allocated"] - start for m in memory))


def parity(
    out: dict[str, Any], target: dict[str, Any], num_classes: int, head: str = "yolox"
) -> tuple[float, bool]:
    """Largest relative difference of the terms, and whether the assignments are identical."""
    crit: YOLOXLoss | YOLOFastestLoss
    if head == "yolofastest":
        anchors = fastest_cases.V2_ANCHORS
        ref = fastest_reference.ReferenceYOLOFastest(num_classes, anchors)
        crit = YOLOFastestLoss(anchors=anchors)
    else:
        ref = reference.ReferenceYOLOX(num_classes, use_l1=True)
        crit = YOLOXLoss(l1_activate_epoch=0)
    ref_terms, ref_assign = ref(leaves(out), target["gt"], target["img_size"])
    terms = crit({"pred": leaves(out)}, target)
    worst = max(
        abs(float(terms[k].detach()) - float(ref_terms[k].detach()))
        / max(abs(float(ref_terms[k].detach())), 1e-12)
        for k in terms
    )
    a = crit.assign(out, target)
    same = all(
        torch.equal(a.fg_mask[i], r["fg_mask"]) and torch.equal(a.matched_gt[i], r["matched_gt"])
        for i, r in enumerate(ref_assign)
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
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads={args.threads}, repeats={args.repeats}"
    )
    print()
    print(
        "| setting | implementation | fwd ms | fwd+bwd ms | peak extra MiB | speed-up fwd | speed-up fwd+bwd | memory vs loop |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    notes = []
    for name in args.settings:
        spec = SETTINGS[name]
        head = spec.get("head", "yolox")
        loop = LOOPS[head]
        make = fastest_cases.make_batch if head == "yolofastest" else cases.make_batch
        out, target = make(
            0,
            batch=len(spec["counts"]),
            num_classes=num_classes,
            img=352 if head == "yolofastest" else 640,
            counts=spec["counts"],
            informed=0.5,
        )
        impls = (fastest_implementations if head == "yolofastest" else implementations)(target, num_classes)
        if not spec.get("baseline", True):
            impls.pop(loop)
        else:
            worst, same = parity(out, target, num_classes, head)
            notes.append(
                f"{name}: identical assignment: {same}; largest relative term difference {worst:.1e}"
            )
        rows = {}
        for label, fn in impls.items():
            reps = args.repeats if label != loop or name != "crowded" else max(2, args.repeats // 2)
            rows[label] = (timed(fn, out, reps, False), timed(fn, out, reps, True), peak_memory(fn, out))
        base = rows.get(loop)
        for label, (fwd, both, mem) in rows.items():
            ratio = ("", "", "")
            if base is not None and label != loop:
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
