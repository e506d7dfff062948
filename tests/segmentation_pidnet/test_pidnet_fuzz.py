# SPDX-License-Identifier: Apache-2.0
"""Property-based tests: any input gives finite terms or an InputError naming the criterion and key."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from losskit import InputError, LosskitError
from losskit_segmentation_pidnet import PIDNetLoss

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
BD_DTYPES = [torch.bool, torch.uint8, torch.int64, torch.float16, torch.float32, torch.float64]
DEFECTS = [
    "none",
    "none",
    "none",
    "nan_pred",
    "inf_extra_d",
    "label_too_big",
    "label_negative",
    "float_labels",
    "missing_pred",
    "missing_extra_d",
    "missing_bd_gt",
    "extra_p_none",
    "wrong_classes",
    "wrong_d_channels",
    "spatial_mismatch",
    "batch_mismatch",
    "bd_value",
    "bd_nan",
    "zero_size_logits",
    "empty_labels",
    "ndim",
    "not_a_tensor",
    "int_logits",
    "class_weights_length",
]
SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], str]:
    b = draw(st.integers(0, 3))
    c = draw(st.integers(1, 4))
    h, w = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    height, width = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    dtype = draw(st.sampled_from(FLOATS))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.1, 1.0, 10.0, 100.0]))
    out: dict[str, Any] = {
        "pred": (scale * torch.randn(b, c, h, w, generator=g)).to(dtype),
        "extra_p": (scale * torch.randn(b, c, h, w, generator=g)).to(dtype),
        "extra_d": (scale * torch.randn(b, 1, h, w, generator=g)).to(dtype),
    }
    labels = torch.randint(0, c, (b, height, width), generator=g)
    labels[torch.rand(b, height, width, generator=g) < draw(st.sampled_from([0.0, 0.3, 1.0]))] = 255
    bd = (torch.rand(b, height, width, generator=g) < 0.3).to(draw(st.sampled_from(BD_DTYPES)))
    target: dict[str, Any] = {
        "target": labels.to(draw(st.sampled_from([torch.int64, torch.int32, torch.uint8]))),
        "bd_gt": bd,
    }
    fields: dict[str, Any] = {"ohem": draw(st.booleans()), "ohem_min_kept": draw(st.integers(1, 300))}
    if draw(st.booleans()):
        fields["class_weights"] = [float(i + 1) for i in range(c)]
    defect = draw(st.sampled_from(DEFECTS))
    n = b * height * width
    if defect == "nan_pred" and b:
        out["pred"] = out["pred"].clone()
        out["pred"].view(-1)[0] = float("nan")
    elif defect == "inf_extra_d" and b:
        out["extra_d"] = out["extra_d"].clone()
        out["extra_d"].view(-1)[-1] = float("inf")
    elif defect == "label_too_big" and n:
        target["target"] = labels.clone()
        target["target"].view(-1)[0] = c + draw(st.integers(0, 3))
    elif defect == "label_negative" and n:
        target["target"] = labels.clone()
        target["target"].view(-1)[0] = -1
    elif defect == "float_labels":
        target["target"] = labels.float()
    elif defect in ("missing_pred", "missing_extra_d"):
        del out[defect.removeprefix("missing_")]
    elif defect == "missing_bd_gt":
        del target["bd_gt"]
    elif defect == "extra_p_none":
        out["extra_p"] = None
    elif defect == "wrong_classes":
        out["extra_p"] = torch.randn(b, c + 1, h, w, generator=g).to(dtype)
    elif defect == "wrong_d_channels":
        out["extra_d"] = torch.randn(b, 2, h, w, generator=g).to(dtype)
    elif defect == "spatial_mismatch":
        out["extra_d"] = torch.randn(b, 1, h + 1, w, generator=g).to(dtype)
    elif defect == "batch_mismatch":
        target["target"] = torch.zeros(b + 1, height, width, dtype=torch.int64)
    elif defect == "bd_value" and n:
        target["bd_gt"] = torch.full((b, height, width), 2, dtype=torch.int64)
    elif defect == "bd_nan" and n:
        target["bd_gt"] = torch.full((b, height, width), float("nan"))
    elif defect == "zero_size_logits":
        out = {k: v[..., :0] for k, v in out.items()}
    elif defect == "empty_labels":
        target = {k: v[:, :0] for k, v in target.items()}
    elif defect == "ndim":
        out["pred"] = out["pred"][0] if b else out["pred"].flatten()
    elif defect == "not_a_tensor":
        out["extra_d"] = [out["extra_d"]]
    elif defect == "int_logits":
        out["pred"] = out["pred"].to(torch.int64)
    elif defect == "class_weights_length":
        fields["class_weights"] = [1.0] * (c + 1)
    return out, target, fields, defect


def _snapshot(mapping: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in mapping.items()}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):  # bit-identical (NaN included)
        if not (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape):
            return False
        if a.is_floating_point():
            return torch.allclose(a.detach(), b, rtol=0.0, atol=0.0, equal_nan=True)
        return torch.equal(a, b)
    return a is b or a == b


@SETTINGS
@given(cases())
def test_finite_or_input_error_and_never_mutated(case: Any) -> None:
    out, target, fields, defect = case
    leaves = {
        k: v.requires_grad_() for k, v in out.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
    }
    before_out, before_target = _snapshot(out), _snapshot(target)
    crit = PIDNetLoss(**fields)
    try:
        terms = crit(out, target)
    except InputError as exc:
        assert str(exc).startswith("pidnet_loss: "), str(exc)
        assert exc.key.startswith(("out", "target")), exc.key
    except LosskitError as exc:  # pragma: no cover - any other losskit error is a bug here
        raise AssertionError(f"unexpected {type(exc).__name__}: {exc}") from exc
    else:
        assert list(terms) == list(PIDNetLoss.terms), defect
        assert list(terms.diagnostics) == list(PIDNetLoss.diagnostics)
        for name, value in terms.items():
            assert value.dim() == 0 and torch.isfinite(value), (defect, name, value)
        terms.total.backward()
        for key, leaf in leaves.items():
            if leaf.grad is not None:
                assert torch.isfinite(leaf.grad.float()).all(), (defect, key)
    assert list(out) == list(before_out) and list(target) == list(before_target)
    for k in out:
        assert _same(out[k], before_out[k]), k
    for k in target:
        assert _same(target[k], before_target[k]), k


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(0, 2**16), st.booleans())
def test_bit_identical_twice(batch: int, classes: int, seed: int, ohem: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    crit = PIDNetLoss(ohem=ohem, ohem_min_kept=50)
    out, target = crit.example(batch, generator=g)
    if classes != 4:
        out = {
            k: v.detach()[:, : min(classes, v.shape[1])].clone() if k != "extra_d" else v.detach().clone()
            for k, v in out.items()
        }
        target = {**target, "target": torch.where(target["target"] == 255, 255, target["target"] % classes)}
    results = []
    for _ in range(2):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in out.items()}
        terms = crit(leaves, target)
        terms.total.backward()
        results.append([t.detach() for t in terms.values()] + [v.grad for v in leaves.values()])
    for a, b in zip(*results):
        assert torch.equal(a, b)
