# SPDX-License-Identifier: Apache-2.0
"""Malformed inputs raise located InputErrors; value checks; empty batches; inputs are not modified."""

from __future__ import annotations

import pytest
import torch

from losskit import InputError
from losskit.checks import set_value_checks
from losskit_pose_rtmcc import RTMCCLoss, rtmcc_loss

SIZE = (16, 12)  # 32 + 24 bins


def batch(n: int = 2, k: int = 3) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(n, k, 56, generator=g).requires_grad_()
    kp = torch.cat((torch.rand(n, k, 2, generator=g) * torch.tensor(SIZE), torch.full((n, k, 1), 2.0)), -1)
    return {"pred": pred}, {"keypoints": kp}


def test_bin_count_mismatch_states_both_numbers_and_suggests_a_size() -> None:
    out, target = batch()
    crit = RTMCCLoss()  # 256x256: 512 + 512 bins
    with pytest.raises(InputError) as error:
        crit(out, target)
    message = str(error.value)
    assert message.startswith("rtmcc_loss: out['pred']: has 56 bins")
    assert "W_x + W_y = 512 + 512 = 1024" in message
    # keeping h = 256 (512 y bins) leaves no x bins; a square 14x14 or the true 16x12 would do
    assert "[14, 14]" in message
    pred = torch.randn(1, 17, 384 + 512)
    kp = torch.zeros(1, 17, 3)
    with pytest.raises(InputError, match=r"set input_size to \[192, 256\] or \[256, 192\] or \[224, 224\]"):
        crit({"pred": pred}, {"keypoints": kp})
    with pytest.raises(InputError, match=r"no integer input_size gives 1023 bins with split_ratio 2.0"):
        crit({"pred": torch.randn(1, 17, 1023)}, {"keypoints": kp})
    with pytest.raises(InputError, match="has 56 bins"):
        rtmcc_loss(out["pred"], target["keypoints"])


@pytest.mark.parametrize(
    ("out", "target", "where", "text"),
    [
        ({}, None, "out['pred']", "missing"),
        ({"pred": [1.0]}, None, "out['pred']", "expected a tensor"),
        ({"pred": torch.zeros(2, 3, 56, dtype=torch.int64)}, None, "out['pred']", "floating-point"),
        ({"pred": torch.zeros(2, 56)}, None, "out['pred']", "got shape (2, 56)"),
        (None, {}, "target['keypoints']", "missing"),
        (None, {"keypoints": torch.zeros(2, 3, 2)}, "target['keypoints']", "expected shape (2, 3, 3)"),
        (None, {"keypoints": torch.zeros(3, 3, 3)}, "target['keypoints']", "got (3, 3, 3)"),
        (None, {"keypoints": torch.zeros(2, 3, 3, dtype=torch.bool)}, "target['keypoints']", "torch.bool"),
        (
            None,
            {"keypoints": torch.zeros(2, 3, 3, device="meta")},
            "target['keypoints']",
            "is on meta, but out['pred'] is on cpu",
        ),
    ],
)
def test_malformed_inputs(out: dict | None, target: dict | None, where: str, text: str) -> None:
    good_out, good_target = batch()
    with pytest.raises(InputError) as error:
        RTMCCLoss(input_size=SIZE)(
            good_out if out is None else out, good_target if target is None else target
        )
    assert str(error.value).startswith(f"rtmcc_loss: {where}: ")
    assert text in str(error.value)


def test_mask_index_out_of_range() -> None:
    out, target = batch(k=3)
    with pytest.raises(InputError, match=r"mask index 3 is out of range for K = 3"):
        RTMCCLoss(input_size=SIZE, mask=(0, 3))(out, target)


def test_value_checks() -> None:
    out, target = batch()
    kp = target["keypoints"].clone()
    kp[1, 2, 2] = float("nan")
    with pytest.raises(InputError, match=r"visibility .* not finite at \(n, k\) = \(1, 2\)"):
        RTMCCLoss(input_size=SIZE)(out, {"keypoints": kp})
    kp = target["keypoints"].clone()
    kp[0, 1, 0] = float("inf")
    with pytest.raises(InputError, match=r"non-finite coordinates at \(n, k\) = \(0, 1\)"):
        RTMCCLoss(input_size=SIZE)(out, {"keypoints": kp})
    kp[0, 1, 2] = 0.0  # unlabelled: its coordinates are not read
    RTMCCLoss(input_size=SIZE)(out, {"keypoints": kp})
    pred = out["pred"].detach().clone()
    pred[0, 0, 5] = float("nan")
    with pytest.raises(InputError, match=r"out\['pred'\]: contains non-finite values"):
        RTMCCLoss(input_size=SIZE)({"pred": pred}, target)


def test_without_value_checks_bad_keypoints_are_dropped_and_stay_finite() -> None:
    out, target = batch()
    kp = target["keypoints"].clone()
    kp[1, 2, 2] = float("nan")
    kp[0, 1, 0] = float("inf")
    kp[0, 0, :2] = 1e30  # finite, far outside
    set_value_checks("never")
    try:
        terms = RTMCCLoss(input_size=SIZE)(out, {"keypoints": kp})
    finally:
        set_value_checks(None)
    assert float(terms.diagnostics["num_weighted"]) == 3.0
    (terms["x"] + terms["y"]).backward()
    assert torch.isfinite(out["pred"].grad).all()


def test_empty_batch_keeps_the_graph() -> None:
    for n, k in ((0, 3), (2, 0)):
        out, target = batch(n, k)
        terms = RTMCCLoss(input_size=SIZE)(out, target)
        assert float(terms["x"]) == 0.0 and float(terms["y"]) == 0.0
        (terms["x"] + terms["y"]).backward()
        assert out["pred"].grad is not None and out["pred"].grad.shape == (n, k, 56)


def test_inputs_are_not_modified() -> None:
    out, target = batch()
    before = (out["pred"].detach().clone(), target["keypoints"].clone())
    terms = RTMCCLoss(input_size=SIZE, normalize=True)(out, target)
    (terms["x"] + terms["y"]).backward()
    assert torch.equal(out["pred"].detach(), before[0]) and torch.equal(target["keypoints"], before[1])
    assert set(out) == {"pred"} and set(target) == {"keypoints"}
