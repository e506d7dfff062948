# SPDX-License-Identifier: Apache-2.0
"""The installed plugin: entry-point discovery, configs/classification.yaml, absent first-party criteria."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

import losskit
from losskit_classification import CrossEntropy, FocalLoss

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "classification.yaml"


@pytest.mark.parametrize(("name", "cls"), [("cross_entropy", CrossEntropy), ("focal_loss", FocalLoss)])
def test_discovered_through_the_entry_point(name, cls):
    info = losskit.Registry().get(name)
    assert info.cls is cls
    assert info.distribution == "losskit-classification"
    assert info.version == "0.1.0"
    assert info.plugin == "classification"
    assert info.summary  # first docstring line, shown by `losskit list`


def test_config_file_builds_and_runs():
    composite = losskit.build_losses(CONFIG, registry=losskit.Registry())
    assert list(composite) == ["cross_entropy", "focal_loss"]
    assert composite.weights == {"cross_entropy": 1.0, "focal_loss": 1.0}
    assert composite["cross_entropy"].config.label_smoothing == 0.1
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(8, 5, generator=g, requires_grad=True)
    labels = torch.randint(0, 5, (8,), generator=g)
    result = composite({"pred": pred}, {"target": labels})
    result.total.backward()
    ce = torch.nn.functional.cross_entropy(pred, labels, label_smoothing=0.1)
    one_hot = torch.nn.functional.one_hot(labels, 5).float()
    focal = torchvision.ops.sigmoid_focal_loss(pred, one_hot, reduction="mean")
    assert torch.allclose(result.parts["cross_entropy"], ce.detach())
    assert torch.allclose(result.parts["focal_loss"], focal.detach())
    assert torch.allclose(result.parts["total"], (ce + focal).detach())
    assert set(result.parts) == {"cross_entropy", "focal_loss", "total"}
    assert torch.isfinite(pred.grad).all()


def test_runtime_override_and_device_move():
    composite = losskit.build_losses(
        "- {criterion: cross_entropy, class_weights: [1.0, 2.0, 3.0]}",
        overrides={"ignore_index": 255},
        registry=losskit.Registry(),
    )
    crit = composite["cross_entropy"]
    assert crit.config.ignore_index == 255
    composite.to(torch.float64)
    assert crit.class_weights.dtype == torch.float64
    assert "criteria.cross_entropy.class_weights" not in composite.state_dict()  # the config is the truth


def test_examples_run():
    for cls in (CrossEntropy, FocalLoss):
        crit = cls()
        out, target = crit.example(generator=torch.Generator().manual_seed(1))
        loss = crit(out, target)
        loss.backward()
        assert loss.shape == () and torch.isfinite(loss)
