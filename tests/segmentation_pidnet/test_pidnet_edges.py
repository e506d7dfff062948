# SPDX-License-Identifier: Apache-2.0
"""Where the reference returns NaN or crashes, malformed inputs, no mutation, determinism."""

from __future__ import annotations

import pytest
import torch
from pidnet_cases import IGNORE, grads, make_batch, reference_terms

import losskit
from losskit import ConfigError, InputError
from losskit_segmentation_pidnet import PIDNetLoss

TERMS = ["ce", "boundary", "boundary_ce"]
DIAGNOSTICS = ["ce_p", "ce_i", "valid_pixels", "ce_i_pixels", "boundary_ce_pixels"]


def _finite_grads(terms, inputs):
    for name in terms:
        assert terms[name].requires_grad, name
        for g in grads(terms[name], inputs):
            assert torch.isfinite(g).all(), name


def test_no_boundary_pixel_gives_zero_not_nan():
    out, target = make_batch(2, 3, 5, 6, 20, 24)
    with torch.no_grad():
        out["extra_d"].fill_(-10.0)  # sigmoid < 0.8 everywhere: the start of training
    ref = reference_terms(out["pred"], out["extra_p"], out["extra_d"], target["target"], target["bd_gt"])
    assert torch.isnan(ref["boundary_ce"])  # what the reference port returns
    got = PIDNetLoss()(out, target)
    assert got["boundary_ce"] == 0
    assert got.diagnostics["boundary_ce_pixels"] == 0
    torch.testing.assert_close(got["ce"], ref["ce"])
    torch.testing.assert_close(got["boundary"], ref["boundary"])
    _finite_grads(got, list(out.values()))


@pytest.mark.parametrize("ohem", [False, True])
def test_all_ignored_gives_zero_ce(ohem):
    out, target = make_batch(2, 3, 5, 6, 20, 24, d_scale=10.0)
    target["target"] = torch.full_like(target["target"], IGNORE)
    ref = reference_terms(out["pred"], out["extra_p"], out["extra_d"], target["target"], target["bd_gt"])
    assert torch.isnan(ref["ce"]) and torch.isnan(ref["boundary_ce"])
    got = PIDNetLoss(ohem=ohem)(out, target)  # OHEM: PIDNet issue #14 crashed here
    assert got["ce"] == 0 and got["boundary_ce"] == 0
    torch.testing.assert_close(got["boundary"], ref["boundary"])  # boundary needs no labels
    _finite_grads(got, list(out.values()))
    assert got.diagnostics["valid_pixels"] == 0


@pytest.mark.parametrize("how", ["absent", "none"])
def test_inference_head_gives_connected_zero(how):
    out, _ = make_batch(2, 3, 5, 6, 20, 24)
    if how == "absent":
        del out["extra_p"]
    else:
        out["extra_p"] = None
    with torch.no_grad():
        out["pred"][0, 0, 0, 0] = float("nan")  # even through NaN the zero has zero gradients
    crit = PIDNetLoss()
    got = crit(out, {})  # targets are not read
    assert list(got) == TERMS and list(got.diagnostics) == DIAGNOSTICS
    assert all(v == 0 for v in got.values())
    got.total.backward()
    assert torch.equal(out["pred"].grad, torch.zeros_like(out["pred"]))
    assert torch.equal(out["extra_d"].grad, torch.zeros_like(out["extra_d"]))


def test_empty_batch():
    out, target = make_batch(0, 3, 5, 6, 20, 24)
    got = PIDNetLoss(ohem=True)(out, target)
    assert list(got) == TERMS and all(v == 0 for v in got.values())
    got.total.backward()


def test_inputs_are_not_mutated():
    out, target = make_batch(2, 3, 5, 6, 20, 24, dtype=torch.float32)
    out_before = {k: v.detach().clone() for k, v in out.items()}
    target_before = {k: v.clone() for k, v in target.items()}
    out_ids = {k: id(v) for k, v in out.items()}
    for ohem in (False, True):
        PIDNetLoss(ohem=ohem)(out, target).total.backward()
    assert {k: id(v) for k, v in out.items()} == out_ids and list(out) == list(out_before)
    for k in out:
        assert torch.equal(out[k].detach(), out_before[k])
    assert list(target) == list(target_before)
    for k in target:
        assert torch.equal(target[k], target_before[k])


def test_deterministic_on_cpu():
    def run():
        out, target = make_batch(2, 19, 16, 32, 128, 256, dtype=torch.float32, seed=9)
        terms = PIDNetLoss(ohem=True, ohem_min_kept=1000)(out, target)
        terms.total.backward()
        return [t.detach() for t in terms.values()] + [v.grad for v in out.values()]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def _bad(out, target, key, *needles, **fields):
    with pytest.raises(InputError) as info:
        PIDNetLoss(**fields)(out, target)
    message = str(info.value)
    assert message.startswith(f"pidnet_loss: {key}: "), message
    for needle in needles:
        assert needle in message, message
    assert not isinstance(info.value, (IndexError, KeyError))


def test_malformed_inputs():
    out, target = make_batch(2, 3, 5, 6, 20, 24)
    _bad({**out, "extra_p": out["extra_p"][:, :2]}, target, "out['extra_p']", "3 classes", "(2, 2, 5, 6)")
    _bad(
        {**out, "extra_d": out["extra_d"].expand(2, 3, 5, 6)},
        target,
        "out['extra_d']",
        "one boundary channel",
    )
    _bad(
        {**out, "extra_p": out["extra_p"][..., :5]}, target, "out['extra_p']", "spatial size", "(2, 3, 5, 5)"
    )
    _bad({**out, "extra_d": out["extra_d"][:1]}, target, "out['extra_d']", "(2, 1, 5, 6)")
    _bad({**out, "pred": out["pred"][0]}, target, "out['pred']", "4-D")
    _bad({**out, "pred": out["pred"].long()}, target, "out['pred']", "floating")
    _bad({k: v for k, v in out.items() if k != "pred"}, target, "out['pred']", "missing")
    _bad({k: v for k, v in out.items() if k != "extra_d"}, target, "out['extra_d']", "missing")
    _bad(out, {"target": target["target"]}, "target['bd_gt']", "missing")
    _bad(out, {**target, "target": target["target"][:1]}, "target['target']", "B = 2")
    _bad(out, {**target, "target": target["target"].float()}, "target['target']", "integer")
    _bad(out, {**target, "bd_gt": target["bd_gt"][..., :-1]}, "target['bd_gt']", "(2, 20, 23)")
    _bad(out, target, "out['pred']", "class_weights has 2 entries", class_weights=[1.0, 2.0])


@pytest.mark.parametrize("value", [3, 7, -1])
def test_labels_out_of_range(value):
    out, target = make_batch(2, 3, 5, 6, 20, 24)
    labels = target["target"].clone()
    labels[1, 4, 5] = value
    _bad(out, {**target, "target": labels}, "target['target']", "[0, 3)", "ignore_index=255", repr(value))


def test_ignore_index_inside_class_range():
    out, target = make_batch(2, 3, 5, 6, 20, 24)
    labels = target["target"].clone()
    labels[labels == IGNORE] = 0
    got = PIDNetLoss(ignore_index=0)(out, {**target, "target": labels})
    ref = reference_terms(
        out["pred"], out["extra_p"], out["extra_d"], labels, target["bd_gt"], ignore_index=0
    )
    for name in TERMS:
        torch.testing.assert_close(got[name], ref[name])


def test_bad_values():
    out, target = make_batch(2, 3, 5, 6, 20, 24)
    bd = target["bd_gt"].clone()
    bd[0, 0, 0] = 0.5
    _bad(out, {**target, "bd_gt": bd}, "target['bd_gt']", "{0, 1}", "0.5")
    nan = out["extra_p"].detach().clone()
    nan[0, 0, 0, 0] = float("nan")
    _bad({**out, "extra_p": nan}, target, "out['extra_p']", "NaN")


def test_value_checks_off_treats_bad_labels_as_ignored():
    out, target = make_batch(2, 3, 5, 6, 20, 24)
    labels = target["target"].clone()
    labels[0, :3] = 17
    ignored = labels.clone()
    ignored[0, :3] = IGNORE
    losskit.set_value_checks("never")
    try:
        got = PIDNetLoss()(out, {**target, "target": labels})
    finally:
        losskit.set_value_checks(None)
    want = PIDNetLoss()(out, {**target, "target": ignored})
    for name in TERMS:
        torch.testing.assert_close(got[name], want[name])


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"balance_weights": [1.0, 2.0, 3.0]}, "balance_weights"),
        ({"boundary_threshold": 1.5}, "boundary_threshold"),
        ({"ohem_min_kept": 0}, "ohem_min_kept"),
        ({"class_weights": [1.0, -1.0]}, "class_weights"),
        ({"ohem_tresh": 0.7}, "did you mean 'ohem_thresh'"),
    ],
)
def test_config_errors(fields, needle):
    with pytest.raises(ConfigError) as info:
        PIDNetLoss(**fields)
    assert needle in str(info.value) and "pidnet_loss" in str(info.value)
