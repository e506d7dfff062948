# SPDX-License-Identifier: Apache-2.0
"""Benchmark: losskit ``retinanet_loss`` against torchvision's ``RetinaNet.compute_loss``.

Setting (defaults): B = 8 images of 640 x 640, torchvision's default RetinaNet anchors from its own
``AnchorGenerator`` (sizes 32..512 x 2^{0,1/3,2/3}, ratios 0.5/1/2, P3-P7: 76,725 anchors), C = 80
classes, seeded random gt boxes, logits ~ N(-4, 1), deltas ~ N(0, 0.3). Three cases of gt counts (``--cases``):
``uniform`` (``--gts`` = 12 per image), ``skewed`` (one image with 50, one empty, the others 12: the batch
is padded to the most crowded image) and ``crowded`` (one image with 500 gts, the others ``--gts``).
Both sides get the same ``(B, A, C)`` / ``(B, A, 4)`` head outputs (torchvision's head concatenates
the levels; losskit also accepts the per-level list, reported on its own row). torchvision's path is
``RetinaNet.compute_loss`` itself (its ``Matcher``, ``box_iou`` and ``RetinaNetHead.compute_loss``),
called on a stand-in ``self`` holding a real ``RetinaNetHead`` (its weights are not used by the loss).

Timing: the median of ``--repeats`` runs after one warm-up round, of the forward alone and of forward +
backward (``(classification + bbox_regression).backward()``), with fresh leaf inputs cloned outside the
timed region. The cases run round-robin (one run of each per round) so that load from other processes
on a shared machine hits them alike. ``--threads`` sets torch's intra-op threads (default: torch's
choice); value checks off (``LOSSKIT_VALUE_CHECKS=never``) and on (the default on CPU) are both reported
for losskit.

Peak extra memory: one forward + backward runs under ``torch.profiler`` with ``profile_memory=True``.
Every CPU allocation and free made while profiling is recorded with the allocator's running total of
bytes allocated ("Total Allocated" in the trace's ``[memory]`` events); the peak extra memory is the
maximum of that total minus its value before the first event. Inputs are allocated before profiling and
are not counted; the gradient buffers of the inputs (``.grad``, the same ~206 MB on both sides at the
defaults) are allocated during backward and *are* counted, as is everything the loss keeps for backward
and every transient. This is an exact count of tensor bytes requested from the CPU allocator, not RSS
(which the allocator's caching and the OS would blur).

Run: ``flock /tmp/losskit-bench.lock python benchmarks/detection_retinanet.py [--batch 8 ...]``.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead

from losskit.checks import set_value_checks
from losskit_detection_retinanet import RetinaNetLoss

SIZES = tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in (32, 64, 128, 256, 512))
STRIDES = (8, 16, 32, 64, 128)


CASES = ("uniform", "skewed", "crowded")


def gt_counts(case: str, batch: int, gts: int) -> list[int]:
    """Gt boxes per image: ``uniform`` all ``gts``; ``skewed`` 50, ``gts``..., 0; ``crowded`` 500, ``gts``..."""
    if case == "uniform" or batch < 2:
        return [gts] * batch
    if case == "skewed":
        return [50] + [gts] * (batch - 2) + [0]
    return [500] + [gts] * (batch - 1)


def make_inputs(batch: int, image: int, num_classes: int, counts: list[int], seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    gen = AnchorGenerator(SIZES, ((0.5, 1.0, 2.0),) * 5)
    feats = [torch.zeros(batch, 1, -(-image // s), -(-image // s)) for s in STRIDES]
    anchors = gen(ImageList(torch.zeros(batch, 3, image, image), [(image, image)] * batch), feats)
    level_sizes = [f.shape[2] * f.shape[3] * 9 for f in feats]
    a = sum(level_sizes)
    cls = torch.randn(batch, a, num_classes, generator=g) - 4.0
    reg = 0.3 * torch.randn(batch, a, 4, generator=g)
    targets = []
    for gts in counts:
        wh = 16.0 + torch.rand(gts, 2, generator=g) * (image / 2)
        xy = torch.rand(gts, 2, generator=g) * (image - wh)
        targets.append(
            {
                "boxes": torch.cat([xy, xy + wh], 1),
                "labels": torch.randint(0, num_classes, (gts,), generator=g),
            }
        )
    return {"cls": cls, "reg": reg, "anchors": anchors, "targets": targets, "level_sizes": level_sizes}


def torchvision_step(inp: dict[str, Any]) -> Callable[[Tensor, Tensor], dict[str, Tensor]]:
    head = RetinaNetHead(8, 9, inp["cls"].shape[-1])
    model = types.SimpleNamespace(
        proposal_matcher=Matcher(0.5, 0.4, allow_low_quality_matches=True), head=head
    )

    def step(cls: Tensor, reg: Tensor) -> dict[str, Tensor]:
        return RetinaNet.compute_loss(
            model, inp["targets"], {"cls_logits": cls, "bbox_regression": reg}, inp["anchors"]
        )  # type: ignore[arg-type]

    return step


def losskit_step(inp: dict[str, Any]) -> Callable[[Any, Any], dict[str, Tensor]]:
    crit = RetinaNetLoss()
    anchors = inp["anchors"][0]

    def step(cls: Any, reg: Any) -> dict[str, Tensor]:
        return crit({"cls_logits": cls, "bbox_regression": reg, "anchors": anchors}, {"gt": inp["targets"]})

    return step


def _leaves(inp: dict[str, Any], levels: bool) -> tuple[Any, Any]:
    """Fresh leaf inputs: one (B, A, .) tensor each, or per-level contiguous tensors as a head yields them."""
    if not levels:
        return inp["cls"].clone().requires_grad_(), inp["reg"].clone().requires_grad_()
    sizes = inp["level_sizes"]
    return (
        [t.clone().requires_grad_() for t in inp["cls"].split(sizes, dim=1)],
        [t.clone().requires_grad_() for t in inp["reg"].split(sizes, dim=1)],
    )


def time_once(
    step: Callable[..., dict[str, Tensor]], inp: dict[str, Any], backward: bool, levels: bool
) -> float:
    cls, reg = _leaves(inp, levels)
    gc.collect()
    t0 = time.perf_counter()
    losses = step(cls, reg)
    total = losses["classification"] + losses["bbox_regression"]
    if backward:
        total.backward()
    else:
        total.detach().item()
    return time.perf_counter() - t0


def peak_extra_bytes(step: Callable[..., dict[str, Tensor]], inp: dict[str, Any], levels: bool) -> int:
    cls, reg = _leaves(inp, levels)
    gc.collect()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        losses = step(cls, reg)
        (losses["classification"] + losses["bbox_regression"]).backward()
        del losses
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    mem = sorted(
        (e for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0),
        key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)),
    )
    if not mem:
        return 0
    base = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    return int(max(e["args"]["Total Allocated"] for e in mem) - base)


def run_case(args: argparse.Namespace, case: str) -> None:
    counts = gt_counts(case, args.batch, args.gts)
    inp = make_inputs(args.batch, args.image, args.classes, counts, args.seed)
    a = inp["cls"].shape[1]

    # parity check first: the same numbers, or the timing means nothing
    tv = torchvision_step(inp)
    lk = losskit_step(inp)
    set_value_checks("never")
    ref, ours = tv(inp["cls"], inp["reg"]), lk(inp["cls"], inp["reg"])
    parity = {k: abs(float(ours[k]) - float(ref[k])) / abs(float(ref[k])) for k in ref}

    rows = []
    cases: list[tuple[str, Callable[..., dict[str, Tensor]], str, bool]] = [
        ("torchvision RetinaNet.compute_loss", tv, "auto", False),
        ("losskit retinanet_loss, (B, A, C) input", lk, "never", False),
    ]
    if case == "uniform":
        cases += [
            ("losskit retinanet_loss, (B, A, C) input, value checks on", lk, "auto", False),
            ("losskit retinanet_loss, per-level list input", lk, "never", True),
        ]
    # round-robin over the cases, so that load from other processes hits them alike; first round: warm-up
    times: dict[str, dict[bool, list[float]]] = {name: {False: [], True: []} for name, *_ in cases}
    for r in range(args.repeats + 1):
        for name, step, checks, levels in cases:
            set_value_checks(checks)  # type: ignore[arg-type]
            for backward in (False, True):
                dt = time_once(step, inp, backward, levels)
                if r:
                    times[name][backward].append(dt)
    for name, step, checks, levels in cases:
        set_value_checks(checks)  # type: ignore[arg-type]
        mem = peak_extra_bytes(step, inp, levels)
        rows.append((name, statistics.median(times[name][False]), statistics.median(times[name][True]), mem))
    set_value_checks(None)

    print(
        f"case {case}: B={args.batch}, {args.image}x{args.image} px, A={a} anchors, C={args.classes}, "
        f"gts per image {counts}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"median of {args.repeats}"
    )
    print(
        f"parity (relative difference of the terms): {json.dumps({k: float(f'{v:.2e}') for k, v in parity.items()})}\n"
    )
    print(
        "| implementation | forward (ms) | forward + backward (ms) | peak extra memory (MB) | speed-up fwd+bwd | memory ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    base_fb, base_mem = rows[0][2], rows[0][3]
    for name, fwd, fb, mem in rows:
        print(
            f"| {name} | {fwd * 1e3:.0f} | {fb * 1e3:.0f} | {mem / 2**20:.0f} | "
            f"{base_fb / fb:.2f}x | {mem / base_mem:.2f} |"
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image", type=int, default=640)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--gts", type=int, default=12)
    parser.add_argument(
        "--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    for case in args.cases.split(","):
        if case not in CASES:
            parser.error(f"--cases: unknown case {case!r}; allowed: {', '.join(CASES)}")
        run_case(args, case)


if __name__ == "__main__":
    main()
