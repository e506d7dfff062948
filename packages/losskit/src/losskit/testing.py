# SPDX-License-Identifier: Apache-2.0
"""Test utilities for criteria: run a function on several ``torch.distributed`` ranks (gloo, CPU).

Used by losskit's own data-parallel tests and usable by plugin authors::

    results = run_on_ranks(my_fn, world_size=2, args=(batch,))   # my_fn(rank, world_size, *args)

``my_fn`` must be a module-level (picklable) function. Processes talk over loopback only, and the run is
bounded by ``timeout``.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_on_ranks"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: Sequence[Any],
    outdir: str,
    timeout: float,
) -> None:
    import datetime

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout)
    )
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
        # Every rank reaches this point before the group is torn down: destroying a gloo group while
        # the peer still talks to it aborts the process ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # The result is saved: leave without the interpreter's teardown. Even after the barrier, about one
    # run in ten still aborted there (gloo's threads, once the peer process has gone), which fails
    # the run although every rank finished.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_on_ranks(
    fn: Callable[..., Any],
    *,
    world_size: int = 2,
    args: Sequence[Any] = (),
    timeout: float = 120.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return each rank's result."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as outdir:
        mp.start_processes(
            _worker,
            args=(world_size, port, fn, tuple(args), outdir, timeout),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
        return [
            torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)
        ]
