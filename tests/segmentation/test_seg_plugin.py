# SPDX-License-Identifier: Apache-2.0
"""Discovery through the entry point, the shipped (NetsPresso) config, deprecated keys, defaults, example."""

from __future__ import annotations

import dataclasses
import importlib.metadata
from pathlib import Path

import pytest
import torch

import losskit
from losskit.testing import assert_defaults_match
from losskit_segmentation import SegCrossEntropy, SegCrossEntropyConfig, seg_cross_entropy

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "segmentation.yaml"
DIST = "losskit-segmentation"


def test_discovered_through_entry_point():
    info = losskit.Registry().get("seg_cross_entropy")
    assert info.cls is SegCrossEntropy
    assert info.distribution == DIST
    assert info.plugin == "segmentation"
    (ep,) = [e for e in importlib.metadata.entry_points(group="losskit") if e.name == "segmentation"]
    assert ep.value == "losskit_segmentation.plugin"


def test_functional_defaults_come_from_the_config():
    assert_defaults_match(seg_cross_entropy, SegCrossEntropyConfig)


def test_defaults_are_the_netspresso_values():
    c = SegCrossEntropy().config
    assert (c.ignore_index, c.label_smoothing, c.class_weights, c.align_corners) == (255, 0.0, None, False)
    assert c.normalize_across_ranks is False


def test_shipped_netspresso_config_builds_and_runs():
    text = CONFIG.read_text()
    assert "ignore_index: 255 # Default undefined class is 255" in text  # the upstream block, unchanged
    loss = losskit.build_losses(CONFIG)
    crit = loss["seg_cross_entropy"]
    assert crit.config == SegCrossEntropyConfig(ignore_index=255)
    out, target = crit.example(2, generator=torch.Generator().manual_seed(0))
    result = loss(out, target)
    assert set(result.parts) == {"seg_cross_entropy", "total"} and result.diagnostics == {}
    assert torch.isfinite(result.total)
    result.total.backward()
    assert torch.isfinite(out["pred"].grad).all() and out["pred"].grad.abs().sum() > 0


@pytest.mark.parametrize("key", ["size_average", "reduce"])
@pytest.mark.parametrize("value", ["true", "false"])
def test_deprecated_torch_keys_are_rejected(key, value):
    yaml = f"model:\n  losses:\n    - criterion: seg_cross_entropy\n      {key}: {value}\n"
    with pytest.raises(losskit.ConfigError) as error:
        losskit.load_config(yaml)
    message = str(error.value)
    assert f"line 4: model.losses[0].{key} (seg_cross_entropy): {key} is deprecated in torch" in message
    assert "reduction='mean'" in message and "remove the key" in message
    with pytest.raises(losskit.ConfigError, match=f"{key} is deprecated in torch"):
        SegCrossEntropy(**{key: value == "true"})
    with pytest.raises(losskit.ConfigError, match=f"{key} is deprecated in torch"):
        SegCrossEntropy(**{key: None})
    assert key not in {f.name for f in dataclasses.fields(SegCrossEntropyConfig)}


def test_unknown_field_suggests_the_losskit_name():
    with pytest.raises(losskit.ConfigError, match="did you mean 'label_smoothing'"):
        losskit.load_config([{"criterion": "seg_cross_entropy", "label_smothing": 0.1}])


def test_example_is_small_valid_and_seeded():
    crit = SegCrossEntropy()
    a = crit.example(3, generator=torch.Generator().manual_seed(1))
    b = crit.example(3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a[0]["pred"], b[0]["pred"]) and torch.equal(a[1]["target"], b[1]["target"])
    out, target = a
    assert out["pred"].is_leaf and out["pred"].requires_grad
    assert out["pred"].shape == (3, 4, 8, 12) and target["target"].shape == (3, 32, 48)
    assert (target["target"] == 255).any() and (target["target"] > 0).any()
    assert torch.isfinite(crit(out, target))
    weighted = SegCrossEntropy(class_weights=[1.0, 2.0, 1.0], ignore_index=-100)
    out, target = weighted.example(2)
    assert out["pred"].shape[1] == 3 and (target["target"] == -100).any()
    assert torch.isfinite(weighted(out, target))


def test_class_weights_buffer_follows_the_module():
    crit = SegCrossEntropy(class_weights=[1.0, 2.0, 3.0, 4.0])
    assert crit.class_weights is not None and crit.class_weights.tolist() == [1.0, 2.0, 3.0, 4.0]
    assert "class_weights" not in crit.state_dict()
    assert crit.to(torch.float32).class_weights is not None


def test_repr_names_changed_fields():
    assert "label_smoothing=0.1" in repr(SegCrossEntropy(label_smoothing=0.1))
