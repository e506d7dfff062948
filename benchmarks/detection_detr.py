# SPDX-License-Identifier: Apache-2.0
"""Benchmark: losskit's ``detr_loss`` against a reference with RT-DETR's structure.

The baseline is ``tests/detection_detr/detr_reference.py`` (the reference the parity tests compare
with), written from lyuwenyu/RT-DETR's ``rtdetr_criterion.py`` and ``matcher.py``: per output set a
``(B Q, sum n)`` cost matrix moved to the host on its own and split per image, Python loops over the
images to gather matched pairs, one-hot targets and weighted BCE per set. Both run in this process on
the same seeded RT-DETR-shaped outputs (``losskit_detection_detr._example.make_example``):

* ``rtdetr``: B=4, Q=300, C=80, 6 decoder layers + the encoder's top-k (7 matched sets), denoising
  with ``num_denoising=100`` (G=2 groups, N_dn=200 queries, 6 layers), gts per image 50, 8, 6, 4
  (mean 17);
* ``dense``: one image, Q=300, 200 gts (G=1, N_dn=400).

Times are medians over repeated runs (after one warm-up; reference and losskit alternate) of the
forward pass and of forward plus backward. Peak extra memory is the largest amount of CPU memory torch
allocated during one forward plus backward above the level before it (profiler memory events).

Run: ``flock /tmp/losskit-bench.lock python benchmarks/detection_detr.py [--threads 1] [--repeats 7]``.
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

from losskit_detection_detr import DetrLoss
from losskit_detection_detr._example import make_example

HELPERS = Path(__file__).resolve().parents[1] / "tests" / "detection_detr"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, HELPERS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


reference = _load("detr_reference")

SETTINGS: dict[str, dict[str, Any]] = {
    "rtdetr": {"counts": [50, 8, 6, 4]},
    "dense": {"counts": [200]},
}

Loss = Callable[[dict[str, Any]], torch.Tensor]


def fresh(value: Any) -> Any:
    """A copy of the model outputs as new leaves (gts and metadata shared)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    if isinstance(value, dict):
        return {k: fresh(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(fresh(v) for v in value)
    return value


def implementations(target: dict[str, Any]) -> dict[str, Loss]:
    crit = DetrLoss()

    def baseline(out: dict[str, Any]) -> torch.Tensor:
        result = reference.reference(out, target)
        return sum(v for k, v in result.items() if k != "matches")

    def ours(out: dict[str, Any]) -> torch.Tensor:
        terms = crit(out, target)
        return sum(terms.values())

    return {"RT-DETR-structured reference": baseline, "losskit": ours}


def timed(impls: dict[str, Loss], out: dict[str, Any], reps: int, backward: bool) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in impls}
    for i in range(reps + 1):
        for label, fn in impls.items():  # alternate, so that load changes hit both alike
            o = fresh(out)
            start = time.perf_counter()
            loss = fn(o)
            if backward:
                loss.backward()
            elapsed = time.perf_counter() - start
            del loss, o  # free the graph outside the timed region
            if i:  # the first round is a warm-up
                times[label].append(elapsed)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_memory(fn: Loss, out: dict[str, Any]) -> int:
    """Bytes: the peak of torch's CPU allocations during one forward + backward, above the start."""
    o = fresh(out)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(o).backward()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]"]
    if not memory:
        return 0
    start = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(0, *(m["Total Allocated"] - start for m in memory))


def parity(out: dict[str, Any], target: dict[str, Any]) -> tuple[float, bool]:
    """Largest relative difference of the terms, and whether every match is identical."""
    ref = reference.reference(fresh(out), target)
    want = reference.grouped(ref)
    crit = DetrLoss()
    got = crit(fresh(out), target)
    worst = max(
        abs(float(got[k].detach()) - float(want[k].detach())) / max(abs(float(want[k].detach())), 1e-12)
        for k in want
    )
    m = crit.match(out, target)
    pairs = [*zip(m["main"], ref["matches"]["main"])]
    pairs += [p for a, b in zip(m["aux"], ref["matches"]["aux"]) for p in zip(a, b)]
    same = all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in pairs)
    return worst, same


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1: stable numbers)"
    )
    parser.add_argument(
        "--repeats", "--reps", type=int, default=7, help="timed runs per measurement (after one warm-up)"
    )
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads={args.threads}, "
        f"repeats={args.repeats}, load average {os.getloadavg()[0]:.1f}"
    )
    print()
    print(
        "| setting | implementation | fwd ms | fwd+bwd ms | peak extra MiB | speed-up fwd | speed-up fwd+bwd | memory vs reference |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    notes = []
    base_label = "RT-DETR-structured reference"
    for name in args.settings:
        counts = SETTINGS[name]["counts"]
        out, target = make_example(
            len(counts),
            queries=300,
            classes=80,
            logits=80,
            layers=6,
            num_denoising=100,
            img=640,
            generator=torch.Generator().manual_seed(0),
            counts=counts,
        )
        worst, same = parity(out, target)
        notes.append(f"{name}: identical matches: {same}; largest relative term difference {worst:.1e}")
        impls = implementations(target)
        fwd = timed(impls, out, args.repeats, False)
        both = timed(impls, out, args.repeats, True)
        mem = {label: peak_memory(fn, out) for label, fn in impls.items()}
        for label in impls:
            ratio = ("", "", "")
            if label != base_label:
                ratio = (
                    f"{fwd[base_label] / fwd[label]:.1f}x",
                    f"{both[base_label] / both[label]:.1f}x",
                    f"{mem[label] / max(mem[base_label], 1):.2f}x",
                )
            print(
                f"| {name} | {label} | {fwd[label] * 1e3:.1f} | {both[label] * 1e3:.1f} | "
                f"{mem[label] / 2**20:.1f} | {ratio[0]} | {ratio[1]} | {ratio[2]} |"
            )
    print()
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
