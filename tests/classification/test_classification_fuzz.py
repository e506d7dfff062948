# SPDX-License-Identifier: Apache-2.0
"""Property-based fuzzing of the criteria's inputs: a finite loss or a clear losskit error, never a
bare torch error, a silent NaN or a mutated input."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import losskit
from losskit_classification import CrossEntropy, FocalLoss, sigmoid_focal_loss_indexed

MAX_EXAMPLES = 100
SETTINGS = settings(
    max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@st.composite
def tensors(draw, shape, kind):
    """A tensor of ``shape``: ``kind`` is "logits", "probs", "bool" or an int range ``(lo, hi)``."""
    n = math.prod(shape)
    if kind == "bool":
        return torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool).reshape(
            shape
        )
    if isinstance(kind, tuple):
        lo, hi = kind
        dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.uint8])) if lo >= 0 else torch.int64
        values = draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n))
        return torch.tensor(values, dtype=dtype).reshape(shape)
    special = st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e30, -1e30])
    base = st.floats(-50, 50) if kind == "logits" else st.floats(0, 1)
    elems = st.one_of(base, special) if not draw(usually) and n else base
    values = draw(st.lists(elems, min_size=n, max_size=n))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    return torch.tensor(values, dtype=torch.float64).to(dtype).reshape(shape)


usually = st.sampled_from([True] * 7 + [False])  # not st.integers: it favours the boundaries
shapes = st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple)
# mostly valid (N, C, *) shapes, so the value paths get exercised, not only the shape checks
batch_shapes = st.one_of(shapes, st.lists(st.integers(1, 4), min_size=2, max_size=4).map(tuple))


def _check(crit, out, target):
    snapshot = [
        (d, k, v.clone())
        for d in (out, target)
        if isinstance(d, dict)
        for k, v in d.items()
        if isinstance(v, torch.Tensor)
    ]
    try:
        loss = crit(out, target)
    except losskit.LosskitError as exc:
        text = str(exc)
        assert text.startswith(crit.name + ": ") and ("out[" in text or "target[" in text), text
        event("error: " + text.split(":")[1].strip() + ": " + text.split(":")[2].strip()[:30])
    else:
        assert isinstance(loss, torch.Tensor) and loss.shape == () and torch.isfinite(loss), loss
        event("finite loss")
        pred = out["pred"]
        if pred.requires_grad:
            (grad,) = torch.autograd.grad(loss, pred)
            assert torch.isfinite(grad).all()
    for d, k, v in snapshot:
        assert (d[k] is not None and torch.equal(d[k], v)) or (
            torch.isnan(v).any() and torch.equal(d[k].isnan(), v.isnan())
        )


@st.composite
def focal_inputs(draw):
    shape = draw(batch_shapes)
    pred = draw(tensors(shape, "logits")) if draw(usually) else torch.zeros(shape, dtype=torch.int64)
    choice = draw(st.sampled_from(["probs", "bool", "index", "index_bad", "other_shape", "list", "missing"]))
    if choice in ("probs", "bool"):
        target = draw(tensors(shape, choice))
    elif choice in ("index", "index_bad"):
        n = shape[0] if shape else 0
        c = shape[1] if len(shape) > 1 else 1
        rng = (-1, c - 1) if choice == "index" else (-3, c + 2)
        target = draw(tensors((n,), rng))
    elif choice == "other_shape":
        target = draw(tensors(draw(shapes), "probs"))
    else:
        target = [0, 1]
    if pred.is_floating_point() and draw(st.booleans()):
        pred.requires_grad_()
    out = {"pred": pred} if draw(usually) else {"logits": pred}
    return out, ({} if choice == "missing" else {"target": target})


@st.composite
def ce_inputs(draw):
    shape = draw(batch_shapes)
    pred = draw(tensors(shape, "logits")) if draw(usually) else torch.zeros(shape, dtype=torch.int64)
    choice = draw(st.sampled_from(["index", "index", "index_bad", "probs", "bool", "other_shape", "missing"]))
    c = shape[1] if len(shape) > 1 else 1
    tshape = (shape[0], *shape[2:]) if len(shape) > 1 else shape
    if choice in ("index", "index_bad"):
        rng = (0, max(c - 1, 0)) if choice == "index" else (-3, c + 2)
        target = draw(tensors(tshape, rng))
        if choice == "index" and draw(st.booleans()):
            target = target.long().masked_fill(torch.rand(tshape) < 0.5, -100)
    elif choice in ("probs", "bool"):
        target = draw(tensors(shape, choice))
    elif choice == "other_shape":
        target = draw(tensors(draw(shapes), draw(st.sampled_from(["probs", (0, 2)]))))
    else:
        target = None
    if pred.is_floating_point() and draw(st.booleans()):
        pred.requires_grad_()
    return {"pred": pred}, ({} if target is None else {"target": target})


@SETTINGS
@given(
    focal_inputs(),
    st.sampled_from([{}, {"alpha": -1.0, "gamma": 0.0}, {"gamma": 0.5, "normalize_across_ranks": True}]),
)
def test_fuzz_focal_loss(inputs, config):
    _check(FocalLoss(**config), *inputs)


@SETTINGS
@given(
    ce_inputs(),
    st.sampled_from([{}, {"label_smoothing": 0.2, "ignore_index": 1}, {"class_weights": [1.0, 0.0, 2.0]}]),
)
def test_fuzz_cross_entropy(inputs, config):
    _check(CrossEntropy(**config), *inputs)


@SETTINGS
@given(st.integers(0, 5), st.integers(0, 5), st.data())
def test_fuzz_indexed_labels_any_value(n, c, data):
    x = torch.randn(n, c, requires_grad=True)
    labels = torch.tensor(
        data.draw(st.lists(st.integers(-(2**40), 2**40), min_size=n, max_size=n)), dtype=torch.long
    )
    loss = sigmoid_focal_loss_indexed(x, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
