# SPDX-License-Identifier: Apache-2.0
"""retinanet_loss: fields, error messages, empty batches, dtypes, determinism, registry and config."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import retinanet_cases as tl
import torch

import losskit
from losskit_detection_retinanet import RetinaNetLoss

ROOT = Path(__file__).resolve().parents[2]


def _example(b=2, seed=0):
    crit = RetinaNetLoss()
    out, target = crit.example(b, generator=torch.Generator().manual_seed(seed))
    return crit, out, target


def _err(crit, out, target, match):
    with pytest.raises(losskit.InputError, match=match) as info:
        crit(out, target)
    assert str(info.value).startswith("retinanet_loss: ")
    return str(info.value)


# -- fields -------------------------------------------------------------------------------------------


def test_defaults_reproduce_torchvision():
    cfg = RetinaNetLoss().config
    assert (cfg.alpha, cfg.gamma, cfg.fg_iou_thresh, cfg.bg_iou_thresh) == (0.25, 2.0, 0.5, 0.4)
    assert cfg.allow_low_quality_matches and cfg.box_loss == "l1" and cfg.bbox_weights == (1.0, 1.0, 1.0, 1.0)
    assert cfg.normalizer == "image" and cfg.normalize_across_ranks is False


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"bg_iou_thresh": 0.6}, r"retinanet_loss\.bg_iou_thresh: 0\.6 is above fg_iou_thresh 0\.5"),
        ({"box_loss": "gio"}, r"did you mean 'giou'"),
        ({"fg_iou_thresh": 1.5}, r"fg_iou_thresh: 1\.5 is out of range; allowed: \[0, 1\]"),
        ({"alpha": 1.2}, r"alpha: 1\.2 is out of range"),
        ({"gamma": -1.0}, r"gamma: -1 is out of range"),
        ({"bbox_weights": [1.0, 1.0, 1.0]}, r"bbox_weights: expected 4 items, got 3"),
        ({"bbox_weights": [1.0, 1.0, 0.0, 1.0]}, r"bbox_weights: item \[2\]: 0 is out of range"),
        ({"normalizer": "global"}, r"normalizer: got 'global'.*allowed: 'image', 'batch'"),
        ({"gama": 2.0}, r"did you mean 'gamma'"),
    ],
)
def test_field_errors(fields, match):
    with pytest.raises(losskit.ConfigError, match=match):
        RetinaNetLoss(**fields)


def test_terms_and_diagnostics_fixed():
    crit, out, target = _example(3)
    res = crit(out, target)
    assert list(res) == ["classification", "bbox_regression"]
    assert list(res.diagnostics) == ["num_fg", "num_ignored", "invalid_targets"]
    assert all(not d.requires_grad for d in res.diagnostics.values())
    empty = {"gt": [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 3}
    res2 = crit(out, empty)
    assert list(res2) == list(res) and list(res2.diagnostics) == list(res.diagnostics)


# -- inputs -------------------------------------------------------------------------------------------


def test_all_empty_batch_is_finite_with_graph():
    crit, out, _ = _example(2)
    target = {"gt": [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2}
    res = crit(out, target)
    assert torch.isfinite(res.total.detach()) and float(res["bbox_regression"].detach()) == 0.0
    res.total.backward()
    assert (
        out["bbox_regression"][0].grad is not None
        and float(out["bbox_regression"][0].grad.abs().sum()) == 0.0
    )
    assert float(res.diagnostics["num_fg"]) == 0.0


def test_zero_anchor_level_and_zero_batch():
    crit = RetinaNetLoss()
    out = {
        "cls_logits": torch.zeros(0, 5, 3, requires_grad=True),
        "bbox_regression": torch.zeros(0, 5, 4, requires_grad=True),
        "anchors": torch.tensor([[0.0, 0.0, 4.0, 4.0]] * 5),
    }
    res = crit(out, {"gt": []})
    assert float(res.total.detach()) == 0.0
    res.total.backward()


def test_never_mutates_inputs():
    crit, out, target = _example(3, seed=4)
    before_out, before_target = copy.deepcopy(out), copy.deepcopy(target)
    crit(out, target).total.backward()
    crit.match(out, target)
    for key in ("cls_logits", "bbox_regression"):
        for a, b in zip(out[key], before_out[key]):
            assert torch.equal(a, b)
    assert torch.equal(out["anchors"], before_out["anchors"])
    assert set(out) == set(before_out) and set(target) == set(before_target)
    for a, b in zip(target["gt"], before_target["gt"]):
        assert (
            set(a) == {"boxes", "labels"}
            and torch.equal(a["boxes"], b["boxes"])
            and torch.equal(a["labels"], b["labels"])
        )


def test_deterministic_bitwise():
    crit, out, target = _example(3, seed=5)
    a, b = crit(out, target), crit(out, target)
    for k in a:
        assert torch.equal(a[k], b[k])
    ga = torch.autograd.grad(a.total, out["cls_logits"])
    gb = torch.autograd.grad(b.total, out["cls_logits"])
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_close_to_fp32(dtype):
    """Logits/deltas in half precision; matching and box coding run in fp32. Tolerance: 1e-2 relative."""
    cls, reg, anchors, gt = tl.make_batch([5, 0, 9], seed=6)
    crit = RetinaNetLoss()
    ref = crit({"cls_logits": cls, "bbox_regression": reg, "anchors": anchors}, {"gt": gt})
    half = {
        "cls_logits": [t.detach().to(dtype).requires_grad_() for t in cls],
        "bbox_regression": [t.detach().to(dtype).requires_grad_() for t in reg],
        "anchors": anchors.to(dtype),
    }
    gt_half = [{"boxes": g["boxes"].to(dtype), "labels": g["labels"]} for g in gt]
    res = crit(half, {"gt": gt_half})
    res.total.backward()
    for k in ref:
        assert res[k].dtype == torch.float32 and torch.isfinite(res[k])
        assert tl.rel_diff(res[k], ref[k]) < 1e-2, (k, float(res[k]), float(ref[k]))
    assert half["cls_logits"][0].grad.dtype == dtype
    # the matching itself is the fp32 one on the fp32 inputs (boxes rounded to half can move an IoU)
    assert res.diagnostics["num_fg"] > 0


def test_autocast_bf16_cpu():
    cls, reg, anchors, gt = tl.make_batch([4, 7], seed=8)
    crit = RetinaNetLoss()
    out = {"cls_logits": cls, "bbox_regression": reg, "anchors": anchors}
    ref = crit(out, {"gt": gt})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = crit(out, {"gt": gt})
    for k in ref:
        assert torch.isfinite(res[k]) and tl.rel_diff(res[k], ref[k]) < 1e-5
    res.total.backward()


def test_example_runs_quickly_and_backward():
    crit, out, target = _example(4)
    res = crit(out, target)
    res.total.backward()
    assert out["cls_logits"][0].grad is not None and float(res.diagnostics["num_fg"]) > 0


# -- error messages -----------------------------------------------------------------------------------


def test_error_anchor_count():
    crit, out, target = _example()
    out = {**out, "anchors": out["anchors"][:-3]}
    _err(
        crit,
        out,
        target,
        r"out\['anchors'\]: expected \(240, 4\) \(A = the anchors of out\['cls_logits'\]\), got \(237, 4\)",
    )


def test_error_anchor_list_length():
    crit, out, target = _example()
    out = {**out, "anchors": [out["anchors"]] * 3}
    _err(crit, out, target, r"out\['anchors'\]: expected a list of B = 2 tensors, got 3")


def test_error_boxes_shape():
    crit, out, target = _example()
    gt = [dict(target["gt"][0]), target["gt"][1]]
    gt[0]["boxes"] = torch.zeros(2, 5)
    _err(
        crit,
        out,
        {"gt": gt},
        r"target\['gt'\]\[0\]\['boxes'\]: expected shape \(n, 4\) xyxy, got shape \(2, 5\)",
    )


def test_error_labels_out_of_range():
    crit, out, target = _example()
    gt = [dict(target["gt"][0]), target["gt"][1]]
    gt[0]["labels"] = torch.tensor([0, 3])
    msg = _err(crit, out, {"gt": gt}, r"target\['gt'\]\[0\]\['labels'\]: labels must be in \[0, 3\)")
    assert "got 3" in msg


def test_error_labels_count_and_dtype():
    crit, out, target = _example()
    gt = [dict(target["gt"][0]), target["gt"][1]]
    gt[0]["labels"] = torch.tensor([0])
    _err(crit, out, {"gt": gt}, r"\['labels'\]: expected shape \(2,\) \(one per box\), got shape \(1,\)")
    gt[0]["labels"] = torch.tensor([0.0, 1.0])
    _err(crit, out, {"gt": gt}, r"\['labels'\]: expected an integer tensor, got torch.float32")


def test_error_mismatched_levels():
    crit, out, target = _example()
    out2 = {**out, "bbox_regression": out["bbox_regression"][:1]}
    _err(crit, out2, target, r"out\['bbox_regression'\]: expected 2 levels like out\['cls_logits'\], got 1")
    swapped = {**out, "bbox_regression": out["bbox_regression"][::-1]}
    _err(
        crit,
        swapped,
        target,
        r"out\['bbox_regression'\]\[0\]: expected \(2, 192, 4\) to match out\['cls_logits'\]\[0\]",
    )


def test_error_level_shapes():
    crit, out, target = _example()
    bad = {**out, "cls_logits": [out["cls_logits"][0], torch.zeros(2, 48, 4)]}
    _err(crit, bad, target, r"out\['cls_logits'\]\[1\]: expected \(B=2, HWA_l, C=3\)")
    bad = {**out, "bbox_regression": torch.zeros(2, 240, 5)}
    _err(crit, bad, target, r"out\['bbox_regression'\]: expected shape \(B, A, 4\), got \(2, 240, 5\)")
    bad = {**out, "bbox_regression": torch.zeros(2, 239, 4)}
    _err(crit, bad, target, r"out\['bbox_regression'\]: expected 240 anchors in all")


def test_error_missing_keys_and_batch():
    crit, out, target = _example()
    _err(
        crit,
        {k: v for k, v in out.items() if k != "anchors"},
        target,
        r"out\['anchors'\]: missing; out has keys",
    )
    _err(crit, {k: v for k, v in out.items() if k != "cls_logits"}, target, r"out\['cls_logits'\]: missing")
    _err(crit, out, {"boxes": []}, r"target\['gt'\]: missing; target has keys 'boxes'")
    _err(
        crit,
        out,
        {"gt": target["gt"][:1]},
        r"target\['gt'\]: expected 2 entries \(the batch size of out\['cls_logits'\]\), got 1",
    )
    _err(
        crit,
        out,
        {"gt": [target["gt"][0], {"boxes": torch.zeros(0, 4)}]},
        r"target\['gt'\]\[1\]\['labels'\]: missing",
    )


def test_error_degenerate_and_nonfinite_boxes():
    crit, out, target = _example()
    gt = [dict(target["gt"][0]), target["gt"][1]]
    gt[0]["boxes"] = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 5.0, 9.0]])
    _err(crit, out, {"gt": gt}, r"box 1 = \[5.0, 5.0, 5.0, 9.0\] has zero or negative width or height")
    gt[0]["boxes"] = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, float("nan"), 7.0, 9.0]])
    _err(crit, out, {"gt": gt}, r"target\['gt'\]\[0\]\['boxes'\]: contains non-finite values")


def test_error_nonfinite_logits_named():
    crit, out, target = _example()
    bad = [out["cls_logits"][0], out["cls_logits"][1].detach().clone()]
    bad[1][0, 3, 1] = float("nan")
    _err(crit, {**out, "cls_logits": bad}, target, r"out\['cls_logits'\]\[1\]: contains non-finite values")


def test_value_checks_off_skips_checks(monkeypatch):
    monkeypatch.setenv("LOSSKIT_VALUE_CHECKS", "never")
    crit, out, target = _example()
    bad = [out["cls_logits"][0], out["cls_logits"][1].detach().clone()]
    bad[1][0, 3, 1] = float("nan")
    res = crit({**out, "cls_logits": bad}, target)  # no check, no sync: the NaN propagates
    assert torch.isnan(res["classification"])


# -- registry and config ------------------------------------------------------------------------------


def test_entry_point_discovery():
    info = losskit.Registry().get("retinanet_loss")
    assert info.distribution == "losskit-detection-retinanet" and info.cls is RetinaNetLoss


def test_config_file_builds_and_runs():
    composite = losskit.build_losses(ROOT / "configs" / "detection-retinanet.yaml")
    crit = composite["retinanet"]
    out, target = crit.example(2, generator=torch.Generator().manual_seed(0))
    result = composite(out, target)
    assert set(result.parts) >= {"retinanet/classification", "retinanet/bbox_regression", "total"}
    assert set(result.diagnostics) == {
        "retinanet/num_fg",
        "retinanet/num_ignored",
        "retinanet/invalid_targets",
    }
    result.total.backward()
