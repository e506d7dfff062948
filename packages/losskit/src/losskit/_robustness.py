# SPDX-License-Identifier: Apache-2.0
"""The robustness matrix behind :func:`losskit.testing.check_robustness`.

A criterion's ``example()`` goes through a fixed list of mutations (missing and extra keys, wrong
types, dtypes and ranks, an empty batch, degenerate and inverted boxes, out-of-range labels, NaN, inf
and huge values, non-contiguous and channels-last layouts, one input on another device), each run with
value checks on and off. Every run must keep the rule written in
``docs/distributed-and-mixed-precision.md``:

* an error is a ``ValueError`` subclass (losskit's ``InputError`` or ``ConfigError``) whose message
  names the key it is about, never a raw ``RuntimeError``/``IndexError``/... from torch;
* finite inputs give a finite loss and finite gradients, with value checks off as well as on;
* ``out`` and ``target`` are never mutated;
* layout-only mutations (strides, memory format, an extra key) give the unmutated result.

Finally the unmutated call runs from two threads at once, which must agree with a lone call.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from losskit import checks
from losskit.criterion import Criterion

__all__ = ["Mutation", "RobustnessReport", "check_robustness", "mutations"]

Path = tuple[Any, ...]  # ("out", "pred") or ("target", "gt", 0, "boxes")
Expect = Literal["error", "finite", "same", "any"]


@dataclass(frozen=True)
class Mutation:
    """One change of ``(out, target)``.

    Attributes:
        name: ``"<kind> <path>"``, e.g. ``"nan target['gt'][0]['boxes']"``.
        apply: returns the mutated ``(out, target)`` from deep copies (it may change them in place).
        key: the top-level key an error must name.
        expect: ``"error"`` (a typed error is required), ``"same"`` (the unmutated result, or a typed
            error), ``"finite"`` (a finite result or a typed error; a missing optional key gives a
            result), ``"any"`` (non-finite inputs: any result or a typed error).
    """

    name: str
    apply: Callable[[dict[str, Any], dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]]
    key: str
    expect: Expect


@dataclass
class RobustnessReport:
    """Counts per value-check mode (``"on"``, ``"off"``): runs, typed errors, results; and failures."""

    criterion: str
    runs: dict[str, int] = field(default_factory=lambda: {"on": 0, "off": 0})
    typed_errors: dict[str, int] = field(default_factory=lambda: {"on": 0, "off": 0})
    results: dict[str, int] = field(default_factory=lambda: {"on": 0, "off": 0})
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [
            f"checks {m}: {self.runs[m]} runs, {self.typed_errors[m]} typed errors, {self.results[m]} results"
            for m in ("on", "off")
        ]
        return f"{self.criterion}: " + "; ".join(parts) + f"; {len(self.failures)} failures"


# -- walking the inputs ------------------------------------------------------------------------------


def _leaves(tree: Any, path: Path = ()) -> Iterator[tuple[Path, Tensor]]:
    if isinstance(tree, Tensor):
        yield path, tree
    elif isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _leaves(v, (*path, i))


def _mappings(tree: Any, path: Path = ()) -> Iterator[tuple[Path, Mapping[Any, Any]]]:
    if isinstance(tree, Mapping):
        yield path, tree
        for k, v in tree.items():
            yield from _mappings(v, (*path, k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _mappings(v, (*path, i))


def _get(root: dict[str, Any], path: Path) -> Any:
    node: Any = root
    for p in path:
        node = node[p]
    return node


def _set(root: dict[str, Any], path: Path, value: Any) -> None:
    parent = _get(root, path[:-1])
    if isinstance(parent, tuple):  # rebuild tuples on the way up
        items = list(parent)
        items[path[-1]] = value
        _set(root, path[:-1], tuple(items))
    else:
        parent[path[-1]] = value


def _fmt(path: Path) -> str:
    return path[0] + "".join(f"[{p!r}]" for p in path[1:])


def _clone(tree: Any) -> Any:
    """A deep copy in which every tensor is a fresh leaf (requires_grad kept for floating tensors)."""
    if isinstance(tree, Tensor):
        t = tree.detach().clone()
        return t.requires_grad_(tree.requires_grad and t.is_floating_point())
    if isinstance(tree, Mapping):
        return {k: _clone(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_clone(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(_clone(v) for v in tree)
    return copy.deepcopy(tree)


def _snapshot(tree: Any) -> Any:
    if isinstance(tree, Tensor):
        return (
            tree.shape,
            tree.dtype,
            tree.device,
            tree.detach().clone() if tree.device.type != "meta" else None,
        )
    if isinstance(tree, Mapping):
        return {k: _snapshot(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [type(tree).__name__, *(_snapshot(v) for v in tree)]
    return repr(tree)


def _same_snapshot(a: Any, b: Any) -> bool:
    if isinstance(a, tuple) and len(a) == 4 and isinstance(a[0], torch.Size):
        if not (isinstance(b, tuple) and len(b) == 4 and a[:3] == b[:3]):
            return False
        if a[3] is None or torch.equal(a[3], b[3]):
            return True
        return a[3].is_floating_point() and torch.allclose(a[3], b[3], rtol=0.0, atol=0.0, equal_nan=True)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_snapshot(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same_snapshot, a, b))
    return bool(a == b)


# -- the mutations -------------------------------------------------------------------------------------


def _replace(path: Path, fn: Callable[[Tensor], Any]) -> Callable[..., tuple[dict[str, Any], dict[str, Any]]]:
    def apply(out: dict[str, Any], target: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        roots = {"out": out, "target": target}
        old = _get(roots, path)
        new = fn(old)
        if isinstance(new, Tensor) and new.is_floating_point() and old.requires_grad:
            new = new.detach().requires_grad_()
        _set(roots, path, new)
        return out, target

    return apply


def _poke(value: float) -> Callable[[Tensor], Any]:
    def fn(t: Tensor) -> Tensor:
        t = t.detach().clone()
        t.view(-1)[t.numel() // 2] = value
        return t

    return fn


def _boxes_like(path: Path, t: Tensor) -> bool:
    return bool(path) and path[-1] == "boxes" and t.dim() == 2 and t.shape[-1] == 4 and t.shape[0] > 0


def _labels_like(path: Path, t: Tensor) -> bool:
    return not t.is_floating_point() and t.dtype != torch.bool and t.numel() > 0


def _degenerate(t: Tensor) -> Tensor:
    t = t.detach().clone()
    t[0, 2] = t[0, 0]
    return t


def _inverted(t: Tensor) -> Tensor:
    t = t.detach().clone()
    t[0, [0, 2]] = t[0, [2, 0]].clone()
    t[0, [1, 3]] = t[0, [3, 1]].clone()
    return t


def _out_of_range(t: Tensor) -> Tensor:
    t = t.detach().clone()
    t.view(-1)[0] = 10**6
    t.view(-1)[-1] = -7
    return t


def _tensor_mutations(path: Path, t: Tensor) -> Iterator[Mutation]:
    key, name = str(path[1]), _fmt(path)
    yield Mutation(
        f"not-a-tensor {name}",
        _replace(path, lambda x: x.tolist() if x.device.type != "meta" else 0),
        key,
        "error",
    )
    yield Mutation(f"meta-device {name}", _replace(path, lambda x: x.to("meta")), key, "error")
    if t.dim() >= 1:
        yield Mutation(f"extra-dim {name}", _replace(path, lambda x: x.unsqueeze(0)), key, "finite")
    if t.dim() >= 2:
        yield Mutation(f"flattened {name}", _replace(path, lambda x: x.reshape(-1)), key, "finite")
        yield Mutation(
            f"non-contiguous {name}",
            _replace(path, lambda x: x.detach().transpose(-1, -2).contiguous().transpose(-1, -2)),
            key,
            "same",
        )
    if t.dim() == 4:
        yield Mutation(
            f"channels-last {name}",
            _replace(path, lambda x: x.detach().contiguous(memory_format=torch.channels_last)),
            key,
            "same",
        )
    if t.is_floating_point():
        yield Mutation(f"as-int64 {name}", _replace(path, lambda x: x.detach().long()), key, "finite")
        if t.numel():
            yield Mutation(f"nan {name}", _replace(path, _poke(math.nan)), key, "any")
            yield Mutation(f"inf {name}", _replace(path, _poke(math.inf)), key, "any")
            yield Mutation(
                f"huge {name}", _replace(path, _poke(1e19 if path[0] == "out" else 1e6)), key, "finite"
            )
        if _boxes_like(path, t):
            yield Mutation(f"degenerate-box {name}", _replace(path, _degenerate), key, "finite")
            yield Mutation(f"inverted-box {name}", _replace(path, _inverted), key, "finite")
    elif t.dtype != torch.bool:
        yield Mutation(f"as-float {name}", _replace(path, lambda x: x.float()), key, "finite")
        if _labels_like(path, t):
            yield Mutation(f"out-of-range {name}", _replace(path, _out_of_range), key, "finite")


def _drop(path: Path) -> Callable[..., tuple[dict[str, Any], dict[str, Any]]]:
    def apply(out: dict[str, Any], target: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        roots = {"out": out, "target": target}
        parent = _get(roots, path[:-1])
        if isinstance(parent, Mapping):
            new = {k: v for k, v in parent.items() if k != path[-1]}
            if len(path) == 2:
                roots[path[0]] = new
            else:
                _set(roots, path[:-1], new)
        return roots["out"], roots["target"]

    return apply


def _add_extra(side: str) -> Callable[..., tuple[dict[str, Any], dict[str, Any]]]:
    def apply(out: dict[str, Any], target: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        (out if side == "out" else target)["losskit_unexpected_key"] = torch.zeros(3)
        return out, target

    return apply


def _empty_batch(batch: int) -> Callable[..., tuple[dict[str, Any], dict[str, Any]]]:
    def shrink(tree: Any) -> Any:
        if isinstance(tree, Tensor):
            if tree.dim() >= 1 and tree.shape[0] == batch:
                small = tree.detach()[:0].clone()
                return small.requires_grad_(tree.requires_grad and small.is_floating_point())
            return tree
        if isinstance(tree, Mapping):
            return {k: shrink(v) for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            if len(tree) == batch and all(isinstance(v, Mapping) for v in tree):
                return type(tree)()
            return type(tree)(shrink(v) for v in tree)
        return tree

    def apply(out: dict[str, Any], target: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        return shrink(out), shrink(target)

    return apply


def mutations(out: Mapping[str, Any], target: Mapping[str, Any], batch: int) -> list[Mutation]:
    """Every mutation the matrix applies to an ``example(batch)`` pair."""
    roots = {"out": out, "target": target}
    result: list[Mutation] = []
    for side, root in roots.items():
        for path, mapping in _mappings(root, (side,)):
            for k in mapping:
                top = str(path[1]) if len(path) > 1 else str(k)
                result.append(Mutation(f"missing {_fmt((*path, k))}", _drop((*path, k)), top, "finite"))
        result.append(Mutation(f"extra-key {side}", _add_extra(side), "", "same"))
        for path, t in _leaves(root, (side,)):
            result.extend(_tensor_mutations(path, t))
    result.append(Mutation("empty-batch", _empty_batch(batch), "", "finite"))
    return result


# -- running -------------------------------------------------------------------------------------------


def _total(result: Any) -> Tensor:
    if isinstance(result, Tensor):
        return result
    if isinstance(result, Mapping) and result:
        values = list(result.values())
        total = values[0]
        for v in values[1:]:
            total = total + v
        return total
    raise TypeError(f"criterion returned {type(result).__name__}")


def _grads(out: Any, total: Tensor) -> list[Tensor]:
    leaves = [t for _, t in _leaves(out) if t.requires_grad and t.is_leaf]
    if not leaves or not total.requires_grad:
        return []
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    return [g for g in grads if g is not None]


def _finite(t: Tensor) -> bool:
    return bool(torch.isfinite(t.detach()).all())


def _call(crit: Criterion[Any], out: Any, target: Any) -> tuple[Tensor, list[Tensor]]:
    total = _total(crit(out, target))
    return total.detach(), _grads(out, total)


def _run_one(
    crit: Criterion[Any], m: Mutation, base: tuple[dict[str, Any], dict[str, Any]], ref: Tensor, mode: str
) -> tuple[str | None, bool]:
    """(failure message or None, whether a typed error was raised)."""
    out, target = m.apply(*(_clone(base[0]), _clone(base[1])))
    before = _snapshot({"out": out, "target": target})
    try:
        value, grads = _call(crit, out, target)
    except ValueError as error:  # InputError and ConfigError are ValueErrors
        text = str(error)
        if m.key and m.key not in text:
            return f"[{mode}] {m.name}: the error does not name {m.key!r}: {text}", True
        return None, True
    except Exception as error:
        return f"[{mode}] {m.name}: raw {type(error).__name__}: {str(error).splitlines()[0][:200]}", False
    if not _same_snapshot(before, _snapshot({"out": out, "target": target})):
        return f"[{mode}] {m.name}: the call mutated out or target", False
    if m.expect == "error":
        return f"[{mode}] {m.name}: expected an error naming {m.key!r}, got a result", False
    if m.expect in ("finite", "same") and not (_finite(value) and all(map(_finite, grads))):
        return (
            f"[{mode}] {m.name}: finite inputs gave a non-finite loss or gradient ({value.tolist()})",
            False,
        )
    if m.expect == "same" and not torch.allclose(value.to(ref.dtype), ref, rtol=1e-5, atol=1e-6):
        return f"[{mode}] {m.name}: changed the result ({value.tolist()} vs {ref.tolist()})", False
    return None, False


def _check_threads(
    crit: Criterion[Any], base: tuple[dict[str, Any], dict[str, Any]], ref: Tensor
) -> str | None:
    results: list[Any] = [None, None]

    def work(i: int) -> None:
        try:
            results[i] = _call(crit, _clone(base[0]), _clone(base[1]))[0]
        except Exception as error:  # reported below
            results[i] = error

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if not isinstance(r, Tensor):
            return f"two threads: a call raised {r!r}"
        if not torch.allclose(r, ref, rtol=1e-6, atol=1e-7, equal_nan=True):
            return f"two threads: {r.tolist()} differs from a lone call's {ref.tolist()}"
    return None


def check_robustness(
    make: Callable[[], Criterion[Any]],
    *,
    batch_size: int = 2,
    seed: int = 0,
    skip: Sequence[str] = (),
    raise_on_failure: bool = True,
) -> RobustnessReport:
    """Run a criterion's ``example()`` through the robustness matrix, with value checks on and off.

    Args:
        make: builds the criterion (``lambda: FocalLoss(gamma=1.0)``); the config to test is the
            factory's business.
        batch_size: the ``example()`` batch size (at least 2, so one image can differ from another).
        seed: seeds the example's generator.
        skip: mutation-name prefixes to leave out, each a documented exception of the criterion
            (``"huge out['pred']"``).
        raise_on_failure: raise ``AssertionError`` listing every failure (else only report them).

    Returns:
        The counts per value-check mode and the failures.
    """
    crit = make()
    g = torch.Generator().manual_seed(seed)
    base = crit.example(batch_size, generator=g)
    report = RobustnessReport(crit.name)
    previous = checks._override
    try:
        checks.set_value_checks("always")
        ref = _call(crit, _clone(base[0]), _clone(base[1]))[0]
        todo = [m for m in mutations(*base, batch_size) if not any(m.name.startswith(s) for s in skip)]
        for mode, setting in (("on", "always"), ("off", "never")):
            checks.set_value_checks(setting)  # type: ignore[arg-type]
            for m in todo:
                failure, typed = _run_one(crit, m, base, ref, mode)
                report.runs[mode] += 1
                report.typed_errors[mode] += typed
                report.results[mode] += not typed and failure is None
                if failure:
                    report.failures.append(failure)
        failure = _check_threads(crit, base, ref)
        if failure:
            report.failures.append(failure)
    finally:
        checks.set_value_checks(previous)
    if report.failures and raise_on_failure:
        raise AssertionError(report.summary() + ":\n  " + "\n  ".join(report.failures))
    return report
