# SPDX-License-Identifier: Apache-2.0
"""No NaN, typed errors, value checks, inputs left alone."""

from __future__ import annotations

import pytest
import torch
from seg_cases import IGNORE, make_batch, reference

import losskit
from losskit.checks import set_value_checks
from losskit_segmentation import SegCrossEntropy, seg_cross_entropy


@pytest.fixture
def checks_off():
    set_value_checks("never")
    try:
        yield
    finally:
        set_value_checks(None)


@pytest.mark.parametrize("size", [(4, 5, 12, 15), (12, 15, 12, 15)], ids=["resized", "equal"])
@pytest.mark.parametrize("fields", [{}, {"label_smoothing": 0.2, "class_weights": [1.0, 2.0, 3.0]}])
def test_all_ignored_gives_zero_and_zero_gradients(size, fields):
    pred, labels = make_batch(2, 3, *size)
    labels.fill_(IGNORE)
    assert torch.isnan(reference(pred, labels, label_smoothing=fields.get("label_smoothing", 0.0)))
    loss = SegCrossEntropy(**fields)({"pred": pred}, {"target": labels})
    assert loss == 0
    loss.backward()
    assert pred.grad is not None and not bool(pred.grad.any())


def test_zero_class_weights_give_zero_not_nan():
    pred, labels = make_batch(2, 3, 4, 5, 12, 15)
    loss = seg_cross_entropy(pred, labels, class_weights=[0.0, 0.0, 0.0], label_smoothing=0.1)
    assert loss == 0
    loss.backward()
    assert torch.isfinite(pred.grad).all()


@pytest.mark.parametrize("bad", [3, -1, 254])
@pytest.mark.parametrize("size", [(4, 5, 12, 15), (12, 15, 12, 15)], ids=["resized", "equal"])
def test_out_of_range_label_is_an_input_error(bad, size):
    pred, labels = make_batch(2, 3, *size)
    labels[1, 2, 3] = bad
    with pytest.raises(losskit.InputError) as error:
        SegCrossEntropy()({"pred": pred}, {"target": labels})
    message = str(error.value)
    assert "target['target']" in message and f"found {bad} (1 pixels)" in message
    assert "[0, 3) or equal ignore_index=255" in message


@pytest.mark.parametrize("size", [(4, 5, 12, 15), (12, 15, 12, 15)], ids=["resized", "equal"])
def test_without_value_checks_out_of_range_labels_are_left_out(checks_off, size):
    pred, labels = make_batch(2, 3, *size)
    bad = labels.clone()
    bad[0, :2] = 7
    bad[1, 3] = -5
    got = seg_cross_entropy(pred, bad, label_smoothing=0.1)
    as_ignored = torch.where((bad < 0) | (bad >= 3), IGNORE, bad)
    torch.testing.assert_close(got, reference(pred, as_ignored, label_smoothing=0.1), rtol=1e-12, atol=0)


def test_non_finite_logits_are_reported_where_checks_run():
    pred, labels = make_batch(2, 3, 4, 5, 12, 15)
    bad = pred.detach().clone()
    bad[0, 1, 2, 3] = float("nan")
    with pytest.raises(losskit.InputError, match=r"out\['pred'\]: contains NaN or infinite logits"):
        seg_cross_entropy(bad, labels)


def test_inputs_are_not_modified():
    pred, labels = make_batch(2, 3, 4, 5, 12, 15)
    before = (pred.detach().clone(), labels.clone())
    seg_cross_entropy(pred, labels, label_smoothing=0.1, class_weights=[1.0, 2.0, 3.0]).backward()
    assert torch.equal(pred.detach(), before[0]) and torch.equal(labels, before[1])


def test_empty_batch_keeps_the_graph():
    pred = torch.randn(0, 3, 4, 5, requires_grad=True)
    loss = SegCrossEntropy()({"pred": pred}, {"target": torch.zeros(0, 8, 10, dtype=torch.int64)})
    assert loss == 0
    loss.backward()
    assert pred.grad is not None


def test_non_contiguous_and_channels_last_logits():
    pred, labels = make_batch(2, 3, 5, 6, 15, 18)
    want = reference(pred, labels)
    base = pred.detach().transpose(2, 3).contiguous().transpose(2, 3)
    torch.testing.assert_close(seg_cross_entropy(base, labels), want, rtol=1e-12, atol=0)
    last = pred.detach().contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(seg_cross_entropy(last, labels), want, rtol=1e-12, atol=0)


ERRORS = [
    ({"pred": torch.zeros(2, 3, 4, 5, dtype=torch.int64)}, None, "out['pred']", "floating-point"),
    ({"pred": torch.zeros(2, 3, 4)}, None, "out['pred']", "(B, C, h, w) logits"),
    ({"pred": torch.zeros(2, 0, 4, 5)}, None, "out['pred']", "C, h, w >= 1"),
    (None, {"target": torch.zeros(2, 8, 10)}, "target['target']", "integer class labels"),
    (None, {"target": torch.zeros(3, 8, 10, dtype=torch.int64)}, "target['target']", "B = 2"),
    (None, {"target": torch.zeros(2, 8, dtype=torch.int64)}, "target['target']", "got shape (2, 8)"),
    (
        None,
        {"target": torch.zeros(2, 8, 10, dtype=torch.int64, device="meta")},
        "target['target']",
        "is on meta",
    ),
    ({}, None, "out['pred']", "missing; out has keys none"),
    (None, {"labels": torch.zeros(2, 8, 10, dtype=torch.int64)}, "target['target']", "missing"),
]


@pytest.mark.parametrize(("out", "target", "key", "text"), ERRORS)
def test_malformed_inputs_are_input_errors(out, target, key, text):
    out = {"pred": torch.zeros(2, 3, 4, 5)} if out is None else out
    target = {"target": torch.zeros(2, 8, 10, dtype=torch.int64)} if target is None else target
    with pytest.raises(losskit.InputError) as error:
        SegCrossEntropy()(out, target)
    assert key in str(error.value) and text in str(error.value)


def test_class_weights_of_the_wrong_length():
    crit = SegCrossEntropy(class_weights=[1.0, 2.0])
    with pytest.raises(losskit.InputError, match="class_weights has 2 values"):
        crit({"pred": torch.zeros(2, 3, 4, 5)}, {"target": torch.zeros(2, 8, 10, dtype=torch.int64)})


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_functional_rejects_bad_label_smoothing(value):
    with pytest.raises(losskit.ConfigError, match="label_smoothing must be in"):
        seg_cross_entropy(
            torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 3, dtype=torch.int64), label_smoothing=value
        )
    with pytest.raises(losskit.ConfigError):
        SegCrossEntropy(label_smoothing=value)
