# SPDX-License-Identifier: Apache-2.0
"""A tiny linear classifier trained with each criterion reaches >= 95% accuracy (the gradients train)."""

from __future__ import annotations

import pytest
import torch

from losskit_classification import CrossEntropy, FocalLoss


def _separable(num_classes=4, dim=8, n=512):
    """Train and test sets: Gaussian blobs around well separated class centres."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(num_classes, dim, generator=g) * 3
    sets = []
    for _ in range(2):
        labels = torch.randint(0, num_classes, (n,), generator=g)
        sets.append((centers[labels] + torch.randn(n, dim, generator=g), labels))
    return sets


@pytest.mark.parametrize(
    ("crit", "target_kind"),
    [
        (CrossEntropy(), "index"),
        (CrossEntropy(label_smoothing=0.1, class_weights=[1.0, 2.0, 1.0, 0.5]), "index"),
        (CrossEntropy(), "soft"),
        (FocalLoss(), "index"),
        (FocalLoss(alpha=-1.0, gamma=1.0), "dense"),
    ],
    ids=["ce", "ce-smooth-weights", "ce-soft", "focal-index", "focal-dense"],
)
def test_linear_classifier_learns(crit, target_kind):
    torch.manual_seed(0)
    (feats, labels), (test_feats, test_labels) = _separable()
    model = torch.nn.Linear(feats.shape[1], 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.5 if isinstance(crit, FocalLoss) else 0.1)
    target = labels if target_kind == "index" else torch.nn.functional.one_hot(labels, 4).float()
    for _ in range(300):
        opt.zero_grad()
        loss = crit({"pred": model(feats)}, {"target": target})
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = (model(test_feats).argmax(1) == test_labels).float().mean().item()
    assert accuracy >= 0.95, accuracy
