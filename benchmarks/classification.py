# SPDX-License-Identifier: Apache-2.0
"""Benchmark of losskit-classification against torch / torchvision, side by side.

Run (serialised with the other benchmarks on a shared machine)::

    flock /tmp/losskit-bench.lock python benchmarks/classification.py [--repeats N] [--quick]

Cases:

* ``focal dense (300000, 80)``: ``torchvision.ops.sigmoid_focal_loss(reduction="mean")`` vs the
  ``focal_loss`` criterion, 0/1 targets with ~1% positives (a dense detector's classification head);
* ``focal index (300000, 80)``: the same loss with class-index targets (``-1`` = background): the
  reference is torchvision on the materialised one-hot target, losskit is the criterion fed the
  ``(N,)`` indices (``sigmoid_focal_loss_indexed``; no one-hot is built);
* ``ce (256, 1000)`` and ``ce (8, 19, 512, 1024)`` (with ``ignore_index=255`` on ~5% of the pixels):
  ``torch.nn.functional.cross_entropy`` vs the ``cross_entropy`` criterion.

Time: for each case and pass (``fwd``: the loss with the graph built, as in training; ``fwd+bwd``: the
loss and its backward), the reference and losskit run alternately (so machine load hits both alike)
after a warm-up; the table shows the median over the repeats in milliseconds and the ratio
reference / losskit (> 1: losskit is faster). The cross-entropy criterion is a thin layer whose ratio
must stay >= 0.95 (at most 5% overhead over raw ``F.cross_entropy``): at (256, 1000), where a call takes
~60 us on 2 threads, that leaves ~3 us for the criterion's Python (``nn.Module.__call__`` alone takes
~1 us), so its common case (int64 class indices on CPU) calls torch's cross-entropy kernel directly
after a handful of attribute checks (see ``losskit_classification.cross_entropy``).

Memory: "peak extra" is the highest resident memory above what was resident before the call (the
inputs already exist): for ``fwd``, during the forward with its result (and so the tensors saved for
backward) still alive; for ``fwd+bwd``, during the forward and backward, the gradient included. It is measured in a fresh subprocess per implementation and case: Linux's ``VmHWM`` is
reset through ``/proc/self/clear_refs`` after a warm-up, and glibc is told to serve every allocation
of 64 KiB or more with ``mmap`` (``MALLOC_MMAP_THRESHOLD_``) so freed tensors leave the resident set
at once and the high-water mark follows the live torch allocations (``tracemalloc`` cannot see them,
and torch's CPU allocator keeps no statistics). Where ``clear_refs`` is not available the column says
"n/a".

Noise: losskit's focal loss runs ~45 small elementwise ops per cache-sized chunk, each an OpenMP
fork/join over the intra-op threads. When the machine is oversubscribed (other processes keep the cores
busy), every join can wait for a descheduled thread, and the focal timings degrade more than the
reference's (~25 large ops): with two busy-looping processes on this 2-core machine, forward+backward
went from ~125 ms to ~0.5-0.7 s (torchvision: ~1 s to ~2 s). The header prints the load average;
compare runs made on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

Case = dict[str, Any]


def make_case(name: str) -> tuple[Callable[[], Any], Callable[[], Any], torch.Tensor]:
    """Return ``(reference_loss, losskit_loss, leaf)`` closures for the named case (seeded)."""
    import torchvision

    from losskit_classification import CrossEntropy, FocalLoss

    g = torch.Generator().manual_seed(0)
    if name.startswith("focal"):
        n, c = 300_000, 80
        x = torch.randn(n, c, generator=g).requires_grad_()
        labels = torch.randint(0, c, (n,), generator=g)
        labels[torch.rand(n, generator=g) > 0.0125] = -1  # ~1% positive elements over the row's 80
        dense = torch.zeros(n, c)
        rows = torch.nonzero(labels >= 0).squeeze(1)
        dense[rows, labels[rows]] = 1.0
        crit = FocalLoss()
        tgt = {"target": dense if name == "focal dense" else labels}

        def ref() -> Any:
            return torchvision.ops.sigmoid_focal_loss(x, dense, alpha=0.25, gamma=2.0, reduction="mean")

        def ours() -> Any:
            return crit({"pred": x}, tgt)

        return ref, ours, x
    if name == "ce (256, 1000)":
        x = torch.randn(256, 1000, generator=g).requires_grad_()
        t = torch.randint(0, 1000, (256,), generator=g)
        crit_ce = CrossEntropy()
        out, tgt = {"pred": x}, {"target": t}
        return (lambda: F.cross_entropy(x, t)), (lambda: crit_ce(out, tgt)), x
    if name == "ce (8, 19, 512, 1024)":
        x = torch.randn(8, 19, 512, 1024, generator=g).requires_grad_()
        t = torch.randint(0, 19, (8, 512, 1024), generator=g)
        t[torch.rand(t.shape, generator=g) < 0.05] = 255
        crit_ce = CrossEntropy(ignore_index=255)
        out, tgt = {"pred": x}, {"target": t}
        return (lambda: F.cross_entropy(x, t, ignore_index=255)), (lambda: crit_ce(out, tgt)), x
    raise SystemExit(f"unknown case {name!r}")


#: The cross-entropy cases are held to a 5% bound, so they get more timings than the focal ones:
#: ``ce (256, 1000)`` takes ~0.06 ms a call, so each of its timings covers SMALL_INNER calls and the
#: median is over at least SMALL_REPEATS timings; ``ce (8, 19, 512, 1024)`` gets at least LARGE_REPEATS.
SMALL_INNER, SMALL_REPEATS, LARGE_REPEATS = 20, 201, 15

CASES = ("focal dense", "focal index", "ce (256, 1000)", "ce (8, 19, 512, 1024)")
LABELS = {
    "focal dense": "focal (300000, 80) dense",
    "focal index": "focal (300000, 80) index",
}


def _fwd(fn: Callable[[], Any], leaf: torch.Tensor) -> None:
    fn()


def _fwd_bwd(fn: Callable[[], Any], leaf: torch.Tensor) -> None:
    fn().backward()
    leaf.grad = None


def time_case(name: str, repeats: int, inner: int) -> dict[str, tuple[float, float]]:
    """Median milliseconds per call of (reference, losskit) for each pass, interleaved."""
    ref, ours, leaf = make_case(name)
    result = {}
    for pass_name, runner in (("fwd", _fwd), ("fwd+bwd", _fwd_bwd)):
        times: dict[str, list[float]] = {"ref": [], "ours": []}
        for fn in (ref, ours):  # warm-up
            runner(fn, leaf)
        for _ in range(repeats):
            for key, fn in (("ref", ref), ("ours", ours)):
                start = time.perf_counter()
                for _ in range(inner):
                    runner(fn, leaf)
                times[key].append((time.perf_counter() - start) / inner * 1e3)
        result[pass_name] = (statistics.median(times["ref"]), statistics.median(times["ours"]))
    return result


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def child_peak(name: str, which: str, pass_name: str) -> None:
    """Subprocess entry: print the peak extra resident memory (MiB) of one forward (the loss and its
    graph kept alive, as until the backward) or one forward+backward."""
    ref, ours, leaf = make_case(name)
    fn = ref if which == "ref" else ours
    _fwd_bwd(fn, leaf)  # warm-up: lazy initialisation is not the loss's memory
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        print(json.dumps(None))
        return
    base = _rss_kib("VmRSS")
    if pass_name == "fwd":
        loss = fn()
        peak = _rss_kib("VmHWM")
        del loss
    else:
        _fwd_bwd(fn, leaf)
        peak = _rss_kib("VmHWM")
    print(json.dumps((peak - base) / 1024))


def peak_extra(name: str, which: str, pass_name: str) -> float | None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    proc = subprocess.run(
        [sys.executable, __file__, "--child", name, which, pass_name],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt_mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per pass (median reported)")
    parser.add_argument("--quick", action="store_true", help="3 repeats, focal dense and ce (256, 1000) only")
    parser.add_argument("--cases", nargs="+", choices=CASES, help="run only these cases")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--child", nargs=3, metavar=("CASE", "IMPL", "PASS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_peak(*args.child)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = args.cases or (("focal dense", "ce (256, 1000)") if args.quick else CASES)
    repeats = 3 if args.quick else args.repeats
    load = ", load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else ""
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {repeats} repeats "
        f"(ce (256, 1000): {max(repeats, SMALL_REPEATS)} timings of {SMALL_INNER} calls; "
        f"ce (8, 19, 512, 1024): {max(repeats, LARGE_REPEATS)} repeats){load}"
    )
    header = (
        f"| {'case':<26} | {'pass':<7} | {'reference ms':>12} | {'losskit ms':>10} | {'ratio':>6} "
        f"| {'ref peak MiB':>12} | {'losskit peak MiB':>16} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name in cases:
        small = name == "ce (256, 1000)"  # ~0.1 ms a call: more calls per timing, more timings
        timings = time_case(
            name,
            max(repeats, SMALL_REPEATS if small else LARGE_REPEATS if name.startswith("ce") else 0),
            SMALL_INNER if small else 1,
        )
        for pass_name, (t_ref, t_ours) in timings.items():
            mems = (
                _fmt_mib(peak_extra(name, "ref", pass_name)),
                _fmt_mib(peak_extra(name, "ours", pass_name)),
            )
            label = LABELS.get(name, name)
            digits = 3 if small else 2
            print(
                f"| {label:<26} | {pass_name:<7} | {t_ref:12.{digits}f} | {t_ours:10.{digits}f} | {t_ref / t_ours:6.2f} "
                f"| {mems[0]:>12} | {mems[1]:>16} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
