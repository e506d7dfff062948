# SPDX-License-Identifier: Apache-2.0
"""Benchmark of ``rtmcc_loss`` against two references written here from the same formulas.

Run (serialised with the other benchmarks on a shared machine)::

    flock /tmp/losskit-bench.lock python benchmarks/pose_rtmcc.py [--repeats N] [--threads T] [--device D]

References (both written for this benchmark, as the upstream code paths are shaped; neither is imported):

* ``netspresso``: a per-keypoint encoder in torch, as NetsPresso Trainer's ``rtmcc_loss`` runs it in the
  training step: one Python iteration per instance and keypoint, two ``exp`` rows each, then the KL of
  every row (``log_softmax``, ``F.kl_div``, mean over bins) weighted and summed, divided by ``K``;
* ``mmpose``: a per-keypoint numpy encoder, as mmpose's ``SimCCLabel`` runs in its data pipeline (here
  timed in the step, since NetsPresso moved it there), then the same row-wise KL on the arrays moved to
  torch.

Cases: ``N=256, K=17``, input ``256x256`` (512 + 512 bins), and ``256x192`` with mmpose's RTMPose-COCO
sigmas ``(4.9, 5.66)`` (384 + 512 bins; NetsPresso's hard-coded 256x256 crashes on it, the reference here
takes the size); about 75% of the keypoints labelled. Each pass is the loss's forward and backward
(the references' encoders are part of the forward). The implementations run alternately after a warm-up;
the table shows the median milliseconds and the ratio reference / losskit (> 1: losskit is faster).

Memory: "peak extra" is the highest memory above what was in use before the call (the inputs exist),
during forward and backward. CPU: measured in a fresh subprocess per implementation from Linux's
``VmHWM`` (reset through ``/proc/self/clear_refs``), glibc serving every allocation of 64 KiB or more
with ``mmap`` so freed tensors leave the resident set; "n/a" where ``clear_refs`` is missing. CUDA:
``max_memory_allocated() - memory_allocated()``.
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
from itertools import product

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

BETA, LABEL_BETA, RATIO = 10.0, 10.0, 2.0
CASES = {"256x256": ((256, 256), (5.66, 5.66)), "256x192": ((192, 256), (4.9, 5.66))}


def batch(case: str, device: torch.device) -> tuple[Tensor, Tensor]:
    """Seeded logits ``(256, 17, W_x + W_y)`` and COCO-like keypoints ``(256, 17, 3)``."""
    (w, h), _ = CASES[case]
    g = torch.Generator().manual_seed(0)
    n, k = 256, 17
    pred = torch.randn(n, k, round(w * RATIO) + round(h * RATIO), generator=g)
    xy = (torch.rand(n, k, 2, generator=g) * 1.1 - 0.05) * torch.tensor([w, h], dtype=torch.float32)
    vis = torch.multinomial(torch.tensor([0.25, 0.15, 0.6]), n * k, replacement=True, generator=g)
    keypoints = torch.cat((xy, vis.view(n, k, 1).float()), -1)
    return pred.to(device).requires_grad_(), keypoints.to(device)


def _row_kl(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """Sum over rows of ``weight * mean_bins KL(softmax(label_beta t) || softmax(beta pred))``."""
    log_p = F.log_softmax(pred.reshape(-1, pred.shape[-1]) * BETA, dim=1)
    q = F.softmax(target.reshape(-1, target.shape[-1]) * LABEL_BETA, dim=1)
    return (F.kl_div(log_p, q, reduction="none").mean(dim=1) * weight.reshape(-1)).sum()


def netspresso_like(
    pred: Tensor, keypoints: Tensor, size: tuple[int, int], sigma: tuple[float, float]
) -> Tensor:
    """Torch encoder with a Python loop over instances and keypoints, in the training step."""
    n, k, _ = pred.shape
    bins = (round(size[0] * RATIO), round(size[1] * RATIO))
    dev = keypoints.device
    centre = torch.round(keypoints[..., :2] * RATIO).to(torch.int64)
    weight = keypoints[..., 2].clone()
    targets = [torch.zeros(n, k, b, device=dev) for b in bins]
    grids = [torch.arange(b, dtype=torch.float32, device=dev) for b in bins]
    radius = torch.tensor(sigma, device=dev) * 3
    for i, j in product(range(n), range(k)):
        if keypoints[i, j, 2] < 0.5:
            continue
        mu = centre[i, j]
        left, top = mu - radius
        right, bottom = mu + radius + 1
        if left >= bins[0] or top >= bins[1] or right < 0 or bottom < 0:
            weight[i, j] = 0
            continue
        for axis in range(2):
            targets[axis][i, j] = torch.exp(-((grids[axis] - mu[axis]) ** 2) / (2 * sigma[axis] ** 2))
    loss = _row_kl(pred[..., : bins[0]], targets[0], weight) + _row_kl(
        pred[..., bins[0] :], targets[1], weight
    )
    return loss / k


def mmpose_like(pred: Tensor, keypoints: Tensor, size: tuple[int, int], sigma: tuple[float, float]) -> Tensor:
    """Numpy encoder with a loop over instances and keypoints, then the KL in torch."""
    kp = keypoints.cpu().numpy()
    n, k, _ = kp.shape
    bins = (round(size[0] * RATIO), round(size[1] * RATIO))
    centre = np.around(kp[..., :2] * RATIO).astype(np.int64)
    weight = kp[..., 2].copy()
    targets = [np.zeros((n, k, b), dtype=np.float32) for b in bins]
    grids = [np.arange(b, dtype=np.float32) for b in bins]
    radius = np.array(sigma) * 3
    for i, j in product(range(n), range(k)):
        if kp[i, j, 2] < 0.5:
            continue
        mu = centre[i, j]
        left, top = mu - radius
        right, bottom = mu + radius + 1
        if left >= bins[0] or top >= bins[1] or right < 0 or bottom < 0:
            weight[i, j] = 0
            continue
        for axis in range(2):
            targets[axis][i, j] = np.exp(-((grids[axis] - mu[axis]) ** 2) / (2 * sigma[axis] ** 2))
    dev = pred.device
    t_x, t_y, w = (torch.from_numpy(a).to(dev) for a in (*targets, weight))
    return (_row_kl(pred[..., : bins[0]], t_x, w) + _row_kl(pred[..., bins[0] :], t_y, w)) / k


IMPLS = ("netspresso", "mmpose", "losskit")


def make(case: str, impl: str, device: torch.device) -> tuple[Callable[[], Tensor], Tensor]:
    from losskit_pose_rtmcc import RTMCCLoss

    size, sigma = CASES[case]
    pred, keypoints = batch(case, device)
    if impl == "netspresso":
        return (lambda: netspresso_like(pred, keypoints, size, sigma)), pred
    if impl == "mmpose":
        return (lambda: mmpose_like(pred, keypoints, size, sigma)), pred
    crit = RTMCCLoss(input_size=size, sigma=sigma)
    out, target = {"pred": pred}, {"keypoints": keypoints}

    def ours() -> Tensor:
        terms = crit(out, target)
        return terms["x"] + terms["y"]

    return ours, pred


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step(fn: Callable[[], Tensor], leaf: Tensor) -> Tensor:
    loss = fn()
    loss.backward()
    leaf.grad = None
    return loss.detach()


def time_case(case: str, repeats: int, device: torch.device) -> tuple[dict[str, float], dict[str, float]]:
    """Median milliseconds of forward+backward per implementation, and the losses."""
    fns = {impl: make(case, impl, device) for impl in IMPLS}
    losses = {impl: float(_step(*fns[impl])) for impl in IMPLS}  # warm-up
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for _ in range(repeats):
        for impl in IMPLS:
            _sync(device)
            start = time.perf_counter()
            _step(*fns[impl])
            _sync(device)
            times[impl].append((time.perf_counter() - start) * 1e3)
    return {impl: statistics.median(v) for impl, v in times.items()}, losses


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def child_peak(case: str, impl: str, device_name: str) -> None:
    """Subprocess entry: print the peak extra memory (MiB) of one forward+backward."""
    device = torch.device(device_name)
    fn, leaf = make(case, impl, device)
    _step(fn, leaf)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _step(fn, leaf)
        torch.cuda.synchronize()
        print(json.dumps((torch.cuda.max_memory_allocated() - base) / 2**20))
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        print(json.dumps(None))
        return
    base = _rss_kib("VmRSS")
    _step(fn, leaf)
    print(json.dumps((_rss_kib("VmHWM") - base) / 1024))


def peak_extra(case: str, impl: str, device: torch.device, threads: int) -> float | None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, __file__, "--threads", str(threads), "--child", case, impl, str(device)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--cases", nargs="+", choices=tuple(CASES), default=tuple(CASES))
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--child", nargs=3, metavar=("CASE", "IMPL", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child_peak(*args.child)
        return
    device = torch.device(args.device)
    load = ", load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else ""
    print(
        f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, median of {args.repeats}{load}"
    )
    print(
        "| case | NetsPresso-like ms | mmpose-like ms | losskit ms | vs NetsPresso | vs mmpose "
        "| peak MiB (NP / mm / losskit) | max rel. loss diff |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for case in args.cases:
        times, losses = time_case(case, args.repeats, device)
        mems = (
            ("-",)
            if args.no_memory
            else tuple(_mib(peak_extra(case, impl, device, torch.get_num_threads())) for impl in IMPLS)
        )
        diff = max(abs(losses[i] - losses["losskit"]) / abs(losses["losskit"]) for i in IMPLS[:2])
        print(
            f"| N=256 K=17 {case} | {times['netspresso']:.1f} | {times['mmpose']:.1f} | {times['losskit']:.1f} "
            f"| {times['netspresso'] / times['losskit']:.1f}x | {times['mmpose'] / times['losskit']:.1f}x "
            f"| {' / '.join(mems)} | {diff:.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
