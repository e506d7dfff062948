# SPDX-License-Identifier: Apache-2.0
"""The ``losskit`` command: list, describe, check and run loss configs."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import torch

from losskit import __version__
from losskit.composite import build_losses
from losskit.config import load_config
from losskit.docgen import render_markdown, render_text
from losskit.errors import ConfigError, LosskitError
from losskit.registry import Registry, get_registry

__all__ = ["main"]


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{w}}}" for w in widths)
    lines = [fmt.format(*header).rstrip(), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r).rstrip() for r in rows]
    return "\n".join(lines)


def _cmd_list(args: argparse.Namespace, registry: Registry, stdout: TextIO, stderr: TextIO) -> int:
    rows = [(info.name, info.provider, info.summary) for info in registry]
    if rows:
        print(_table(rows, ("criterion", "provided by", "description")), file=stdout)
    else:
        print("no criteria installed (pip install losskit-classification, for example)", file=stdout)
    for name, infos in registry.conflicts.items():
        providers = " and ".join(i.provider for i in infos)
        print(f"warning: criterion {name!r} is registered by both {providers}; it is unusable", file=stderr)
    for failure in registry.failures:
        print(f"warning: {failure}", file=stderr)
    return 0


def _cmd_describe(args: argparse.Namespace, registry: Registry, stdout: TextIO, stderr: TextIO) -> int:
    info = registry.get(args.name)
    text = render_markdown(info) if args.format == "markdown" else render_text(info)
    stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def _cmd_check(args: argparse.Namespace, registry: Registry, stdout: TextIO, stderr: TextIO) -> int:
    status = 0
    for path in args.configs:
        try:
            cfg = load_config(path if path != "-" else sys.stdin.read(), registry=registry)
        except ConfigError as exc:
            status = 1
            n = len(exc.problems)
            print(f"{path}: invalid ({n} problem{'s' if n != 1 else ''})", file=stdout)
            for p in exc.problems:
                print(f"  {p}", file=stdout)
            continue
        names = ", ".join(f"{e.name} (x{e.weight:g})" for e in cfg.entries)
        print(f"{path}: ok: {names}", file=stdout)
    return status


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cmd_run(args: argparse.Namespace, registry: Registry, stdout: TextIO, stderr: TextIO) -> int:
    if args.iters < 1:
        raise ConfigError(f"--iters: expected an int >= 1, got {args.iters}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: expected an int >= 1, got {args.batch_size}")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise ConfigError(f"--device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device: {args.device!r} requested but CUDA is not available")
    composite = build_losses(args.config, registry=registry, device=device, epoch=args.epoch)
    generator = torch.Generator().manual_seed(args.seed)
    examples = {}
    for name in composite:
        out, target = composite[name].example(args.batch_size, device=device, generator=generator)
        examples[name] = (out, target)
    leaves = [t for out, _ in examples.values() for t in _tensors(out) if t.requires_grad and t.is_leaf]
    times: list[float] = []
    show_bar = stdout.isatty()
    result = None
    for it in range(args.iters):
        for t in leaves:
            t.grad = None
        _sync(device)
        start = time.perf_counter()
        values = {name: composite[name](*examples[name]) for name in composite}
        result = composite.combine(values)
        result.total.backward()
        _sync(device)
        times.append(time.perf_counter() - start)
        if show_bar:
            done = int(30 * (it + 1) / args.iters)
            stdout.write(f"\r[{'#' * done}{'.' * (30 - done)}] {it + 1}/{args.iters}")
            stdout.flush()
    if show_bar:
        stdout.write("\r" + " " * 50 + "\r")
    if result is None:  # pragma: no cover - iters >= 1
        return 1
    rows = [(key, f"{float(v):.6g}") for key, v in result.parts.items()]
    rows += [(key, f"{float(v):.6g}") for key, v in result.diagnostics.items()]
    print(
        f"config: {args.config}  device: {device}  batch size: {args.batch_size}  iterations: {args.iters}",
        file=stdout,
    )
    print(_table(rows, ("part", "value")), file=stdout)
    grads_ok = all(t.grad is not None and bool(torch.isfinite(t.grad).all()) for t in leaves)
    median_ms = statistics.median(times) * 1e3
    print(
        f"forward+backward: median {median_ms:.2f} ms/iter, first {times[0] * 1e3:.2f} ms; "
        f"gradients {'finite' if grads_ok else 'NOT FINITE'}",
        file=stdout,
    )
    return 0 if grads_ok else 1


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="losskit", description="Build PyTorch losses from YAML configs.")
    parser.add_argument("--version", action="version", version=f"losskit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("list", help="list installed criteria with their providers")
    p.set_defaults(func=_cmd_list)
    p = sub.add_parser("describe", help="show a criterion's fields and expected inputs")
    p.add_argument("name", help="criterion name, e.g. focal_loss")
    p.add_argument("--format", choices=("text", "markdown"), default="text", help="output format")
    p.set_defaults(func=_cmd_describe)
    p = sub.add_parser("check", help="validate loss configs; exit 1 if any is invalid")
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="YAML file(s); '-' reads stdin")
    p.set_defaults(func=_cmd_check)
    p = sub.add_parser("run", help="build the losses and run forward+backward on example batches")
    p.add_argument("config", metavar="CONFIG", help="YAML file")
    p.add_argument("--iters", type=int, default=10, help="iterations (default 10)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--batch-size", type=int, default=2, help="example batch size (default 2)")
    p.add_argument("--epoch", type=int, default=None, help="call set_epoch(EPOCH) first")
    p.add_argument("--seed", type=int, default=0, help="seed of the example batches (default 0)")
    p.set_defaults(func=_cmd_run)
    return parser


def main(argv: Sequence[str] | None = None, *, registry: Registry | None = None) -> int:
    """Entry point of the ``losskit`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    registry = registry if registry is not None else get_registry()
    try:
        return int(args.func(args, registry, sys.stdout, sys.stderr))
    except LosskitError as exc:
        print(f"losskit: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
