# SPDX-License-Identifier: Apache-2.0
"""losskit.testing.check_robustness: passes a well-behaved criterion, catches each kind of misbehaviour."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

import losskit
from losskit.checks import get_tensor
from losskit.testing import check_robustness
from losskit_charbonnier import CharbonnierLoss, CharbonnierLossConfig, charbonnier_loss


@dataclass(frozen=True)
class _NoFields:
    pass


class _Raw(losskit.Criterion[_NoFields]):
    """Indexes with its targets and reads keys without checks: raw errors."""

    name = "raw_loss"
    Config = _NoFields

    def forward(self, out: Any, target: Any) -> torch.Tensor:
        return out["pred"].gather(1, target["target"][:, None]).mean()

    def example(self, batch_size: int = 2, *, device: Any = None, generator: Any = None) -> Any:
        pred = torch.randn(batch_size, 3, generator=generator).requires_grad_()
        return {"pred": pred}, {"target": torch.randint(0, 3, (batch_size,), generator=generator)}


class _Mutating(_Raw):
    """Checks its inputs but scales the caller's target in place."""

    name = "mutating_loss"

    def forward(self, out: Any, target: Any) -> torch.Tensor:
        pred = get_tensor(out, "pred", criterion=self.name, side="out", expected="(N, C)", float_only=True)
        tgt = get_tensor(target, "target", criterion=self.name, side="target", expected="(N,)")
        if tgt.shape != pred.shape[:1] or tgt.is_floating_point() or tgt.device != pred.device:
            raise losskit.InputError(self.name, "target['target']", "does not fit out['pred']")
        tgt.clamp_(0, pred.shape[1] - 1)
        return pred.gather(1, tgt[:, None]).mean()


class _NanOnEmpty(_Mutating):
    """Well checked, but the mean of an empty batch is NaN."""

    name = "nan_loss"

    def forward(self, out: Any, target: Any) -> torch.Tensor:
        pred = get_tensor(out, "pred", criterion=self.name, side="out", expected="(N, C)", float_only=True)
        tgt = get_tensor(target, "target", criterion=self.name, side="target", expected="(N,)")
        if tgt.shape != pred.shape[:1] or tgt.is_floating_point() or tgt.device != pred.device:
            raise losskit.InputError(self.name, "target['target']", "does not fit out['pred']")
        valid = (tgt >= 0) & (tgt < pred.shape[1])
        picked = pred.gather(1, torch.where(valid, tgt, 0)[:, None]).squeeze(1)
        return torch.where(valid, picked, 0.0).mean()


def test_the_example_plugin_passes_in_both_modes() -> None:
    report = check_robustness(CharbonnierLoss)
    assert report.failures == []
    for mode in ("on", "off"):
        assert report.runs[mode] == report.typed_errors[mode] + report.results[mode] > 20
        assert report.typed_errors[mode] >= 5  # missing keys, non-tensors, other device, shapes
    losskit.testing.assert_defaults_match(charbonnier_loss, CharbonnierLossConfig)


def test_raw_errors_are_reported() -> None:
    report = check_robustness(_Raw, raise_on_failure=False)
    assert any("missing out['pred']: raw KeyError" in f for f in report.failures)
    assert any("out-of-range target['target']: raw RuntimeError" in f for f in report.failures)
    with pytest.raises(AssertionError, match="raw_loss: checks on"):
        check_robustness(_Raw)


def test_mutation_of_the_target_is_reported() -> None:
    report = check_robustness(_Mutating, raise_on_failure=False)
    assert any("out-of-range target['target']: the call mutated" in f for f in report.failures)


def test_non_finite_result_from_finite_inputs_is_reported() -> None:
    report = check_robustness(_NanOnEmpty, raise_on_failure=False)
    assert report.failures == [
        "[on] empty-batch: finite inputs gave a non-finite loss or gradient (nan)",
        "[off] empty-batch: finite inputs gave a non-finite loss or gradient (nan)",
    ]
    assert check_robustness(_NanOnEmpty, skip=("empty-batch",)).failures == []


def test_value_check_mode_is_restored() -> None:
    losskit.set_value_checks("never")
    try:
        check_robustness(CharbonnierLoss)
        assert not losskit.value_checks_enabled(torch.zeros(1))
    finally:
        losskit.set_value_checks(None)
