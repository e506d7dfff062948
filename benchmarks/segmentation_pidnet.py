# SPDX-License-Identifier: Apache-2.0
"""Benchmark: losskit's ``pidnet_loss`` against a straightforward implementation of the same formula.

The reference (``reference_loss`` below) is what a direct reading of PIDNet's loss gives, and what
common ports do: upsample the three logit maps to label size with ``F.interpolate``, run
``F.cross_entropy`` on the P and I maps, the class-balanced ``binary_cross_entropy_with_logits`` on the
D map, and ``F.cross_entropy`` a second time on the I map with the labels masked outside the predicted
boundary. With ``--ohem`` rows the reference I-branch and boundary CE use a sort-based OHEM as upstream.
Both run in this process on the same inputs; their values are compared as a sanity check.

Timing: forward + backward of the summed loss (``loss.backward()``), after one warm-up call; the two
implementations alternate, each is run ``--repeats`` times and the median is reported, using
``torch.get_num_threads()`` CPU threads (``--threads N`` to change; or the GPU, synchronised, with
``--device cuda``).

Peak extra memory: the highest amount of tensor memory allocated during one forward + backward beyond
what was allocated before it (inputs, labels and any ``.grad`` from before are excluded; the gradients
written into the inputs' ``.grad`` are included). On CPU it is read from the PyTorch profiler's
allocation records (``profile_memory=True``): every allocation and free of the CPU allocator is a
``[memory]`` event with its byte count; the peak of their running sum is the figure (exact for tensor
storage; Python objects and allocator caching are not counted). On CUDA it is
``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` around the call.

Run: ``flock /tmp/losskit-bench.lock python benchmarks/segmentation_pidnet.py`` (about a minute on two
CPU cores). ``--quick`` runs the main case only with 3 repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from losskit_segmentation_pidnet import PIDNetLoss

IGNORE = 255


def _ohem_reference(score: torch.Tensor, target: torch.Tensor, thresh: float, min_kept: int) -> torch.Tensor:
    """Sort-based OHEM cross-entropy (upstream semantics), on already upsampled logits."""
    pixel = F.cross_entropy(score, target, ignore_index=IGNORE, reduction="none").reshape(-1)
    mask = target.reshape(-1) != IGNORE
    prob = (
        F.softmax(score, dim=1).gather(1, torch.where(target == IGNORE, 0, target).unsqueeze(1)).reshape(-1)
    )
    prob, order = prob[mask].sort()
    if prob.numel() == 0:
        return score.sum() * 0.0
    threshold = max(float(prob[min(min_kept, prob.numel() - 1)].detach()), thresh)
    kept = pixel[mask][order][prob < threshold]
    return kept.mean()


def reference_loss(
    out: dict[str, torch.Tensor], target: dict[str, torch.Tensor], *, ohem: bool = False
) -> torch.Tensor:
    """The PIDNet loss written directly from its formula (PIDNet's defaults)."""
    labels, bd_gt = target["target"], target["bd_gt"]
    size = labels.shape[-2:]
    up = [
        F.interpolate(out[k], size=size, mode="bilinear", align_corners=True)
        for k in ("extra_p", "pred", "extra_d")
    ]
    p, i, d = up
    ce_p = F.cross_entropy(p, labels, ignore_index=IGNORE)
    ce_i = (
        _ohem_reference(i, labels, 0.9, 131072) if ohem else F.cross_entropy(i, labels, ignore_index=IGNORE)
    )
    pos, neg = bd_gt == 1, bd_gt == 0
    n_pos, n_neg = pos.sum().float(), neg.sum().float()
    weight = torch.where(pos, n_neg / (n_pos + n_neg), torch.where(neg, n_pos / (n_pos + n_neg), 0.0))
    boundary = 20.0 * F.binary_cross_entropy_with_logits(d[:, 0], bd_gt, weight=weight)
    bd_label = torch.where(torch.sigmoid(d[:, 0]) > 0.8, labels, IGNORE)
    if ohem:
        boundary_ce = _ohem_reference(i, bd_label, 0.9, 131072)
    else:
        boundary_ce = F.cross_entropy(i, bd_label, ignore_index=IGNORE)
    return 0.4 * ce_p + ce_i + boundary + boundary_ce


def make_inputs(
    batch: int, classes: int, h: int, w: int, height: int, width: int, device: torch.device, seed: int = 0
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Seeded logits and Cityscapes-like targets: blocky labels, a padded strip, thin boundaries."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, classes, (batch, 1, height // 32 + 1, width // 32 + 1), generator=g).float()
    labels = F.interpolate(coarse, size=(height, width), mode="nearest")[:, 0].long()
    labels[:, -height // 16 :] = IGNORE
    edge = torch.zeros(batch, height, width, dtype=torch.bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[:, :, 1:] |= labels[:, :, 1:] != labels[:, :, :-1]
    out = {
        "pred": torch.randn(batch, classes, h, w, generator=g),
        "extra_p": torch.randn(batch, classes, h, w, generator=g),
        "extra_d": 2.0 * torch.randn(batch, 1, h, w, generator=g),
    }
    out = {k: v.to(device).requires_grad_() for k, v in out.items()}
    return out, {"target": labels.to(device), "bd_gt": edge.float().to(device)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clear(out: dict[str, torch.Tensor]) -> None:
    for v in out.values():
        v.grad = None


def _step(fn: Callable[[], torch.Tensor], out: dict[str, torch.Tensor]) -> float:
    _clear(out)
    loss = fn()
    loss.backward()
    return float(loss.detach())


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak tensor bytes allocated by ``fn()`` beyond what was allocated before (see module doc)."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path, encoding="utf-8") as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    records = [
        e["args"] for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0
    ]
    records.sort(key=lambda a: a.get("Ev Idx", 0))
    live = peak = 0
    for a in records:
        live += int(a["Bytes"])
        peak = max(peak, live)
    return peak


def run_case(
    label: str, shape: tuple[int, ...], *, ohem: bool, repeats: int, device: torch.device
) -> dict[str, Any]:
    out, target = make_inputs(*shape, device=device)
    crit = PIDNetLoss(ohem=ohem).to(device)
    impls: dict[str, Callable[[], torch.Tensor]] = {
        "reference": lambda: reference_loss(out, target, ohem=ohem),
        "losskit": lambda: crit(out, target).total,
    }
    values = {name: _step(fn, out) for name, fn in impls.items()}  # warm-up and value check
    times: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(repeats):
        for name, fn in impls.items():
            _sync(device)
            t0 = time.perf_counter()
            _step(fn, out)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    memory = {}
    for name, fn in impls.items():
        _clear(out)  # outside the measured region: frees of earlier gradients are not counted
        memory[name] = peak_extra_bytes(lambda fn=fn: fn().backward(), device)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {
        "case": label,
        "ref_ms": 1e3 * med["reference"],
        "losskit_ms": 1e3 * med["losskit"],
        "speedup": med["reference"] / med["losskit"],
        "ref_mib": memory["reference"] / 2**20,
        "losskit_mib": memory["losskit"] / 2**20,
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
    main_case = (4, 19, 64, 128, 512, 1024)
    cases = [("B=4 C=19 64x128 -> 512x1024", main_case, False)]
    if not args.quick:
        cases += [
            ("same, OHEM on", main_case, True),
            ("B=2 C=19 63x94 -> 500x750", (2, 19, 63, 94, 500, 750), False),
        ]
    repeats = 3 if args.quick else args.repeats
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, repeats {repeats}")
    print(
        "| case | reference fwd+bwd (ms) | losskit fwd+bwd (ms) | speed-up | reference peak extra (MiB) "
        "| losskit peak extra (MiB) | rel. diff of loss |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, shape, ohem in cases:
        r = run_case(label, shape, ohem=ohem, repeats=repeats, device=device)
        print(
            f"| {r['case']} | {r['ref_ms']:.0f} | {r['losskit_ms']:.0f} | {r['speedup']:.2f}x "
            f"| {r['ref_mib']:.0f} | {r['losskit_mib']:.0f} | {r['rel_diff']:.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
