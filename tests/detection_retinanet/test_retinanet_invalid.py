# SPDX-License-Identifier: Apache-2.0
"""Finite in, finite out with value checks off: invalid gts and anchors, extreme deltas, device mismatches.

What value checks would reject (the CPU default) gets a defined treatment when they are off (the
accelerator default): a degenerate, inverted or non-finite gt box, or a label outside ``[0, C)``, is left
out of matching as if absent and counted in ``invalid_targets``; an invalid anchor is background; size
deltas are clamped before ``exp``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import torch

import losskit
from losskit.checks import set_value_checks
from losskit.testing import assert_defaults_match
from losskit_detection_retinanet import RetinaNetLoss, RetinaNetLossConfig, retinanet_loss


@pytest.fixture
def checks_off() -> Iterator[None]:
    set_value_checks("never")
    try:
        yield
    finally:
        set_value_checks(None)


def _example(b: int = 3, seed: int = 0, **cfg):
    crit = RetinaNetLoss(**cfg)
    out, target = crit.example(b, generator=torch.Generator().manual_seed(seed))
    return crit, out, target


def _fresh(out):
    return {
        "cls_logits": [t.detach().clone().requires_grad_() for t in out["cls_logits"]],
        "bbox_regression": [t.detach().clone().requires_grad_() for t in out["bbox_regression"]],
        "anchors": out["anchors"],
    }


def _run(crit, out, target):
    """Terms, diagnostics and input gradients of one forward + backward on fresh leaves."""
    out = _fresh(out)
    res = crit(out, target)
    res.total.backward()
    grads = [t.grad for t in out["cls_logits"] + out["bbox_regression"]]
    return res, grads


def _assert_finite(res, grads):
    assert all(torch.isfinite(v) for v in res.values()), dict(res)
    assert all(torch.isfinite(g).all() for g in grads)


def _with_extra_gt(target, image: int, box: list[float], label: int):
    """``target`` with one more gt in ``image``, inserted first (so that the valid ones are re-indexed)."""
    gt = [dict(g) for g in target["gt"]]
    g = gt[image]
    g["boxes"] = torch.cat([torch.tensor([box], dtype=g["boxes"].dtype), g["boxes"]])
    g["labels"] = torch.cat([torch.tensor([label], dtype=g["labels"].dtype), g["labels"]])
    return {"gt": gt}


# -- config: one source of defaults ---------------------------------------------------------------------


def test_functional_defaults_come_from_the_config():
    assert RetinaNetLoss.Config is RetinaNetLossConfig
    assert_defaults_match(retinanet_loss, RetinaNetLossConfig)
    assert RetinaNetLoss().config == RetinaNetLossConfig()


# -- invalid gts: left out as if absent -------------------------------------------------------------------

INVALID_GTS = {
    "zero-width": ([10.0, 10.0, 10.0, 30.0], 1),
    "inverted": ([30.0, 10.0, 12.0, 30.0], 1),
    "zero-height-point": ([10.0, 10.0, 10.0, 10.0], 0),
    "label-C": ([4.0, 4.0, 40.0, 40.0], 3),
    "label-minus-1": ([4.0, 4.0, 40.0, 40.0], -1),
    "nan-box": ([float("nan"), 4.0, 40.0, 40.0], 0),
    "inf-box": ([4.0, 4.0, float("inf"), 40.0], 0),
}


@pytest.mark.parametrize("box_loss", ["l1", "ciou"])
@pytest.mark.parametrize("case", sorted(INVALID_GTS))
def test_invalid_gt_is_left_out_as_if_absent(checks_off, case, box_loss):
    crit, out, target = _example(box_loss=box_loss)
    box, label = INVALID_GTS[case]
    bad = _with_extra_gt(target, 0, box, label)
    res, grads = _run(crit, out, bad)
    _assert_finite(res, grads)
    assert float(res.diagnostics["invalid_targets"]) == 1.0
    ref, ref_grads = _run(crit, out, target)
    assert float(ref.diagnostics["invalid_targets"]) == 0.0
    for k in ref:
        torch.testing.assert_close(res[k], ref[k], rtol=1e-6, atol=0.0)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-6, atol=1e-12)
    assert res.diagnostics["num_fg"] == ref.diagnostics["num_fg"]
    # the matches index the given list: the valid gts moved up by one in image 0
    m_bad, m_ref = crit.match(out, bad), crit.match(out, target)
    assert torch.equal(torch.where(m_bad[0] >= 0, m_bad[0] - 1, m_bad[0]), m_ref[0])
    assert torch.equal(m_bad[1:], m_ref[1:])


def test_an_image_of_only_invalid_gts_is_all_background(checks_off):
    crit, out, target = _example()
    gt = [dict(g) for g in target["gt"]]
    gt[2] = {
        "boxes": torch.tensor([[5.0, 5.0, 5.0, 20.0], [9.0, 9.0, 3.0, 3.0]]),
        "labels": torch.tensor([0, 1]),
    }
    res, grads = _run(crit, out, {"gt": gt})
    _assert_finite(res, grads)
    assert float(res.diagnostics["invalid_targets"]) == 2.0
    assert bool((crit.match(out, {"gt": gt})[2] == -1).all())


def test_value_checks_still_reject_invalid_gts():
    crit, out, target = _example()
    with pytest.raises(losskit.InputError, match=r"zero or negative width or height"):
        crit(out, _with_extra_gt(target, 0, [10.0, 10.0, 10.0, 30.0], 1))
    with pytest.raises(losskit.InputError, match=r"labels must be in \[0, 3\)"):
        crit(out, _with_extra_gt(target, 1, [4.0, 4.0, 40.0, 40.0], 3))


# -- invalid anchors: background ---------------------------------------------------------------------------


@pytest.mark.parametrize("box_loss", ["l1", "smooth_l1", "giou", "diou", "ciou"])
@pytest.mark.parametrize("kind", ["zero-width", "inverted", "point"])
def test_invalid_anchor_is_background_and_finite(checks_off, kind, box_loss):
    crit, out, target = _example(box_loss=box_loss)
    # a gt that sits exactly on anchor 5, so the anchor would be foreground
    anchors = out["anchors"].clone()
    gt = [dict(g) for g in target["gt"]]
    gt[0] = {"boxes": anchors[5:6].clone(), "labels": torch.tensor([2])}
    assert int(crit.match(out, {"gt": gt})[0, 5]) == 0
    x1, y1, x2, y2 = anchors[5].tolist()
    anchors[5] = torch.tensor(
        {"zero-width": [x1, y1, x1, y2], "inverted": [x2, y1, x1, y2], "point": [x1, y1, x1, y1]}[kind]
    )
    bad = {**out, "anchors": anchors}
    res, grads = _run(crit, bad, {"gt": gt})
    _assert_finite(res, grads)
    m = crit.match(bad, {"gt": gt})
    assert int(m[0, 5]) == -1
    assert float(res.diagnostics["invalid_targets"]) == 0.0


def test_gt_overlapping_no_anchor_matches_no_invalid_anchor(checks_off):
    """Low-quality matching gives a gt of highest IoU 0 every anchor at IoU 0, but never an invalid one."""
    crit, out, target = _example(box_loss="ciou")
    anchors = out["anchors"].clone()
    anchors[0, 2] = anchors[0, 0]
    gt = [
        {"boxes": torch.tensor([[500.0, 500.0, 510.0, 510.0]]), "labels": torch.tensor([0])},
        *target["gt"][1:],
    ]
    bad = {**out, "anchors": anchors}
    m = crit.match(bad, {"gt": gt})
    assert int(m[0, 0]) == -1 and int((m[0] == 0).sum()) > 0
    _assert_finite(*_run(crit, bad, {"gt": gt}))


# -- extreme deltas ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("box_loss", ["giou", "diou", "ciou"])
@pytest.mark.parametrize("value", [-18.0, -1e4, 30.0, 1e4])
def test_extreme_size_deltas_give_finite_iou_losses(checks_off, box_loss, value):
    crit, out, target = _example(box_loss=box_loss)
    out = _fresh(out)
    with torch.no_grad():
        for t in out["bbox_regression"]:
            t[..., 2:] = value
    res, grads = _run(crit, out, target)
    _assert_finite(res, grads)
    assert float(res.diagnostics["num_fg"]) > 0
    # clamped on both sides: the size deltas get no gradient beyond the clip
    for g in grads[len(out["cls_logits"]) :]:
        assert bool((g[..., 2:] == 0).all())


def test_overflow_message_gives_the_range():
    crit, out, target = _example()
    out = _fresh(out)
    with torch.no_grad():
        out["bbox_regression"][0].fill_(-3e38)
    with pytest.raises(losskit.InputError) as info:
        crit(out, target)
    msg = str(info.value)
    assert msg.startswith("retinanet_loss: out['bbox_regression']: the loss overflowed")
    assert "from -3e+38 to" in msg and "magnitudes too large?" in msg


# -- devices -----------------------------------------------------------------------------------------------


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, device="meta")


@pytest.mark.parametrize(
    ("where", "mutate"),
    [
        ("out['anchors']", lambda o, t: ({**o, "anchors": _meta(o["anchors"])}, t)),
        (
            "out['cls_logits'][1]",
            lambda o, t: ({**o, "cls_logits": [o["cls_logits"][0], _meta(o["cls_logits"][1])]}, t),
        ),
        (
            "out['bbox_regression'][0]",
            lambda o, t: (
                {**o, "bbox_regression": [_meta(o["bbox_regression"][0]), o["bbox_regression"][1]]},
                t,
            ),
        ),
        (
            "out['anchors'][1]",
            lambda o, t: ({**o, "anchors": [o["anchors"], _meta(o["anchors"]), o["anchors"]]}, t),
        ),
        (
            "target['gt'][1]['labels']",
            lambda o, t: (
                o,
                {"gt": [t["gt"][0], {**t["gt"][1], "labels": _meta(t["gt"][1]["labels"])}, t["gt"][2]]},
            ),
        ),
        (
            "target['gt'][2]['boxes']",
            lambda o, t: (
                o,
                {"gt": [t["gt"][0], t["gt"][1], {**t["gt"][2], "boxes": _meta(t["gt"][2]["boxes"])}]},
            ),
        ),
    ],
)
def test_device_mismatch_names_both_keys_and_devices(where, mutate):
    crit, out, target = _example()
    bad_out, bad_target = mutate(out, target)
    with pytest.raises(losskit.InputError) as info:
        crit(bad_out, bad_target)
    assert str(info.value) == (
        f"retinanet_loss: {where}: is on meta, but out['cls_logits'][0] is on cpu; move both to the same device"
    )


def test_device_mismatch_against_single_tensor_logits():
    crit, out, target = _example()
    cat = {k: torch.cat(out[k], 1).detach() for k in ("cls_logits", "bbox_regression")}
    bad = {**cat, "anchors": out["anchors"], "bbox_regression": _meta(cat["bbox_regression"])}
    with pytest.raises(
        losskit.InputError,
        match=re.escape("out['bbox_regression']: is on meta, but out['cls_logits'] is on cpu"),
    ):
        crit(bad, target)
