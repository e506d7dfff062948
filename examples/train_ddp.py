# SPDX-License-Identifier: Apache-2.0
"""Train a tiny classifier with DistributedDataParallel and a loss built from a losskit config.

Run on CPU (gloo) or GPU (nccl), one process per device::

    torchrun --nproc-per-node 2 examples/train_ddp.py --config configs/classification.yaml
    python examples/train_ddp.py --steps 100          # also works as a single process

Each rank draws its own shard of a synthetic, linearly separable task. With ``--global-normalizer``
every criterion that has the ``normalize_across_ranks`` field divides by the count over all ranks, so
the DDP-averaged gradient equals the gradient of the whole global batch (see
docs/distributed-and-mixed-precision.md). Values are read from tensors (a host sync) only on logging
steps.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import losskit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/classification.yaml", help="loss config (YAML)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=64, help="per-rank batch size")
    parser.add_argument("--num-classes", type=int, default=5)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--global-normalizer", action="store_true", help="set normalize_across_ranks=True")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    distributed = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    use_cuda = torch.cuda.is_available()
    if distributed:
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    overrides = {"normalize_across_ranks": True} if args.global_normalizer else None
    try:
        criterion = losskit.build_losses(args.config, device=device, overrides=overrides)
    except losskit.LosskitError as exc:
        print(f"train_ddp: {exc}", file=sys.stderr)
        return 2

    # The same true classifier on every rank; each rank samples its own data.
    truth = torch.randn(args.features, args.num_classes, generator=torch.Generator().manual_seed(args.seed))
    data_gen = torch.Generator().manual_seed(args.seed + 1 + rank)
    torch.manual_seed(args.seed)  # identical initial weights (DDP also broadcasts them)
    model: nn.Module = nn.Linear(args.features, args.num_classes).to(device)
    if distributed:
        model = DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    first = last = None
    for step in range(args.steps):
        x = torch.randn(args.batch_size, args.features, generator=data_gen)
        y = (x @ truth).argmax(dim=1)
        x, y = x.to(device), y.to(device)
        result = criterion({"pred": model(x)}, {"target": y})
        optimizer.zero_grad(set_to_none=True)
        result.total.backward()
        optimizer.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            parts = {k: float(v) for k, v in result.parts.items()}  # host sync on logging steps only
            first = parts["total"] if first is None else first
            last = parts["total"]
            if rank == 0:
                text = "  ".join(f"{k}={v:.4f}" for k, v in parts.items())
                print(f"step {step:4d}  {text}", flush=True)

    with torch.no_grad():
        x = torch.randn(2048, args.features, generator=data_gen)
        y = (x @ truth).argmax(dim=1)
        correct = (model(x.to(device)).argmax(dim=1) == y.to(device)).float().sum()
        total = torch.tensor(float(len(y)), device=device)
        if distributed:
            dist.all_reduce(correct)
            dist.all_reduce(total)
        accuracy = float(correct / total)
    if rank == 0:
        print(
            f"world size {world}: loss {first:.4f} -> {last:.4f}; final accuracy {accuracy:.3f}", flush=True
        )
    if distributed:
        # Free DDP's reducer (kept alive by hooks on the parameters) before its process group goes away;
        # destroying a gloo group that a reducer still holds aborts the process at exit.
        del model, optimizer
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
