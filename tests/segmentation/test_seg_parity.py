# SPDX-License-Identifier: Apache-2.0
"""Parity with ``F.interpolate`` + ``F.cross_entropy``: values and gradients, fp64 and fp32.

Tolerances (the issue's): relative 1e-12 in float64 and 1e-5 in float32, on the loss and on the
gradient (relative to its largest entry).
"""

from __future__ import annotations

import pytest
import torch
from seg_cases import IGNORE, make_batch, reference

from losskit_segmentation import SegCrossEntropy, seg_cross_entropy

SIZES = [
    # (B, C, h, w, H, W)
    (2, 5, 7, 9, 29, 41),  # upsampling, odd ratios
    (2, 4, 8, 8, 8, 8),  # equal sizes: no resizing
    (2, 3, 9, 11, 4, 5),  # downsampling
    (3, 2, 1, 1, 5, 7),
    (2, 4, 5, 7, 5, 30),  # one axis only
]
SETTINGS = [
    {},
    {"label_smoothing": 0.1},
    {"class_weights": "random"},
    {"class_weights": "random", "label_smoothing": 0.25},
    {"label_smoothing": 1.0},
    {"align_corners": True, "label_smoothing": 0.1, "class_weights": "random"},
    {"ignore_index": -100},
    {"ignore_index": 1, "label_smoothing": 0.1},  # an in-range class ignored
]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def _fields(setting: dict, classes: int, seed: int = 0) -> dict:
    fields = dict(setting)
    if fields.get("class_weights") == "random":
        g = torch.Generator().manual_seed(seed + 1)
        fields["class_weights"] = (0.2 + 2 * torch.rand(classes, generator=g, dtype=torch.float64)).tolist()
    return fields


def _compare(pred, labels, fields, dtype, band_elements=None):
    x = pred.detach().to(dtype).requires_grad_()
    ignore = fields.get("ignore_index", IGNORE)
    labels = torch.where(labels == IGNORE, ignore, labels)
    cw = fields.get("class_weights")
    got = seg_cross_entropy(
        x,
        labels,
        ignore_index=ignore,
        label_smoothing=fields.get("label_smoothing", 0.0),
        class_weights=cw,
        align_corners=fields.get("align_corners", False),
        band_elements=band_elements,
    )
    (grad,) = torch.autograd.grad(got, x)
    xr = pred.detach().double().requires_grad_()
    want = reference(
        xr,
        labels,
        ignore_index=ignore,
        label_smoothing=fields.get("label_smoothing", 0.0),
        class_weights=None if cw is None else torch.tensor(cw, dtype=torch.float64),
        align_corners=fields.get("align_corners", False),
    )
    (want_grad,) = torch.autograd.grad(want, xr)
    value_err = float((got.detach().double() - want.detach()).abs() / want.detach().abs())
    grad_err = float((grad.double() - want_grad).abs().max() / want_grad.abs().max())
    return value_err, grad_err


@pytest.mark.parametrize(
    "setting", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()) or "plain"
)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_matches_interpolate_and_cross_entropy(size, setting, dtype):
    pred, labels = make_batch(*size, seed=sum(size))
    fields = _fields(setting, size[1])
    value_err, grad_err = _compare(pred, labels, fields, dtype, band_elements=64)
    assert value_err <= TOL[dtype], value_err
    assert grad_err <= TOL[dtype], grad_err


@pytest.mark.parametrize(
    "setting", [{}, {"class_weights": "random", "label_smoothing": 0.1}], ids=["plain", "cw-ls"]
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_odd_sizes_63x94_to_500x750(setting, dtype):
    pred, labels = make_batch(1, 3, 63, 94, 500, 750, seed=3)
    value_err, grad_err = _compare(pred, labels, _fields(setting, 3), dtype)
    print(f"{dtype} {setting}: loss {value_err:.1e}, gradient {grad_err:.1e}")
    assert value_err <= TOL[dtype], value_err
    assert grad_err <= TOL[dtype], grad_err


def test_criterion_equals_functional_and_reference():
    crit = SegCrossEntropy(label_smoothing=0.1, class_weights=[1.0, 2.0, 0.5])
    pred, labels = make_batch(2, 3, 6, 8, 24, 32, seed=5)
    got = crit({"pred": pred}, {"target": labels})
    want = reference(pred, labels, label_smoothing=0.1, class_weights=torch.tensor([1.0, 2.0, 0.5]))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_integer_label_dtypes():
    pred, labels = make_batch(2, 3, 4, 5, 12, 15, seed=2)
    want = reference(pred, labels)
    for dtype in (torch.uint8, torch.int16, torch.int32):
        got = seg_cross_entropy(pred, labels.to(dtype))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_gradcheck_float64():
    pred, labels = make_batch(1, 3, 2, 3, 5, 4, seed=7)
    cw = [0.5, 1.0, 2.0]

    def fn(x):
        return seg_cross_entropy(x, labels, label_smoothing=0.2, class_weights=cw, band_elements=12)

    assert torch.autograd.gradcheck(fn, (pred,), fast_mode=True)
