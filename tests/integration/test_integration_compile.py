# SPDX-License-Identifier: Apache-2.0
"""Every first-party criterion, and every config's composite, under ``torch.compile(fullgraph=True)``.

Nothing in a forward or backward reads a tensor value back while torch.compile traces (value checks,
cross_entropy's CPU read-back and YOLOX's exact candidate sizing step aside), so each compiles into one
graph and gives the eager values and gradients. The ``eager`` backend keeps the test free of a C++
compiler; dynamo's tracing, where a read would fail, is the same for every backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import losskit
from losskit.registry import FIRST_PARTY
from losskit.schema import required_examples

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
#: Fields a criterion cannot be built without (they have no default), for the ones that have any.


def _required(name: str) -> dict[str, Any]:
    """The example values of the criterion's required fields (for building it without a config file)."""
    return required_examples(losskit.get_registry().get(name).cls.Config)


def _leaves(out):
    """Model outputs that require grad, also inside lists and dicts (DETR's aux sets)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.requires_grad else []
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else ()
    return [t for v in items for t in _leaves(v)]


def _total(result):
    return result.total if isinstance(result, losskit.LossTerms) else result


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", sorted(FIRST_PARTY))
def test_criterion_compiles_into_one_graph(name: str) -> None:
    crit = losskit.get_registry().get(name).cls(**_required(name))
    out, target = crit.example(2, generator=torch.Generator().manual_seed(0))
    leaves = _leaves(out)
    eager = crit(out, target)
    compiled = torch.compile(crit, backend="eager", fullgraph=True)(out, target)
    assert type(compiled) is type(eager)
    if isinstance(eager, losskit.LossTerms):
        assert compiled.keys() == eager.keys() and compiled.diagnostics.keys() == eager.diagnostics.keys()
        for key in eager.diagnostics:
            torch.testing.assert_close(compiled.diagnostics[key], eager.diagnostics[key])
    v_eager, v_compiled = _total(eager), _total(compiled)
    torch.testing.assert_close(v_compiled, v_eager, rtol=1e-6, atol=1e-7)
    g_eager = torch.autograd.grad(v_eager, leaves)
    g_compiled = torch.autograd.grad(v_compiled, leaves)
    for a, b in zip(g_compiled, g_eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_composite_compiles_into_one_graph(path: Path) -> None:
    loss = losskit.build_losses(path)
    generator = torch.Generator().manual_seed(0)
    batches = {name: loss[name].example(2, generator=generator) for name in loss}

    def step(batches):
        return loss.combine({name: loss[name](*batches[name]) for name in batches}).total

    eager = step(batches)
    compiled = torch.compile(step, backend="eager", fullgraph=True)(batches)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)


def test_value_checks_are_off_while_compiling() -> None:
    # "auto" checks CPU tensors eagerly; a traced read would break the graph, so not while compiling
    def flag(x):
        return x + float(losskit.value_checks_enabled(x))

    x = torch.zeros(())
    assert flag(x).item() == 1.0
    assert torch.compile(flag, backend="eager", fullgraph=True)(x).item() == 0.0
