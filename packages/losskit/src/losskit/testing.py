# SPDX-License-Identifier: Apache-2.0
"""Test utilities for criteria, used by losskit's own tests and usable by plugin authors.

* :func:`run_on_ranks` runs a function on several ``torch.distributed`` ranks (gloo, CPU)::

      results = run_on_ranks(my_fn, world_size=2, args=(batch,))   # my_fn(rank, world_size, *args)

  ``my_fn`` must be a module-level (picklable) function. Processes talk over loopback only, and the run
  is bounded by ``timeout``.
* :func:`no_host_sync` fails a CUDA block that synchronises with the host.
* :func:`assert_defaults_match` checks that a functional form takes its defaults from the config.
* :func:`check_robustness` runs a criterion's ``example()`` through the robustness matrix (missing
  keys, dtypes, ranks, an empty batch, degenerate boxes, out-of-range labels, NaN/inf, layouts, another
  device, two threads), with value checks on and off; every plugin's tests call it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from losskit._robustness import RobustnessReport, check_robustness

__all__ = [
    "RobustnessReport",
    "assert_defaults_match",
    "check_robustness",
    "no_host_sync",
    "run_on_ranks",
]


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


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """Within the block, any CUDA host-device synchronisation raises (``set_sync_debug_mode("error")``).

    The mode is restored on exit, also when the block raises. Meant for CUDA tests of a criterion's
    forward and backward; on a machine without CUDA it only runs the block.
    """
    if not torch.cuda.is_available():
        yield
        return
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def assert_defaults_match(fn: Callable[..., Any], config: type[Any]) -> None:
    """Assert that every parameter of ``fn`` named like a field of the ``config`` dataclass has that
    field's default (the config is the single source of defaults), and that at least one does."""
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    shared = [p for p in inspect.signature(fn).parameters.values() if p.name in defaults]
    if not shared:
        raise AssertionError(f"{fn.__name__} has no parameter named like a field of {config.__name__}")
    wrong = [
        f"{p.name}: {p.default!r} != {defaults[p.name]!r}"
        for p in shared
        if p.default is inspect.Parameter.empty or p.default != defaults[p.name]
    ]
    if wrong:
        raise AssertionError(f"{fn.__name__} defaults differ from {config.__name__}: " + "; ".join(wrong))
