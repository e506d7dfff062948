# SPDX-License-Identifier: Apache-2.0
"""retinanet_loss against torchvision's RetinaNet.compute_loss: values, gradients, matched indices."""

from __future__ import annotations

import pytest
import retinanet_cases as tl
import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import sigmoid_focal_loss

from losskit_detection_retinanet import RetinaNetLoss, retinanet_loss

TOL = 1e-5


def _ours(cls, reg, anchors, gt, **cfg):
    crit = RetinaNetLoss(**cfg)
    out = {"cls_logits": cls, "bbox_regression": reg, "anchors": anchors}
    return crit, crit(out, {"gt": gt}), crit.match(out, {"gt": gt})


def _compare(
    counts,
    *,
    image=128,
    num_classes=7,
    seed=0,
    crowded=False,
    box_loss="l1",
    anchors_as_list=False,
    **match_cfg,
):
    cls, reg, anchors, gt = tl.make_batch(
        counts, image=image, num_classes=num_classes, seed=seed, crowded=crowded
    )
    b = len(counts)
    ref, ref_idx = tl.torchvision_loss(cls, reg, anchors, gt, box_loss=box_loss, **match_cfg)
    (ref["classification"] + ref["bbox_regression"]).backward()
    ref_g = tl.grads(cls), tl.grads(reg)
    c2, r2 = tl.fresh(cls), tl.fresh(reg)
    a_in = [anchors.clone() for _ in range(b)] if anchors_as_list else anchors
    _, res, idx = _ours(c2, r2, a_in, gt, box_loss=box_loss, **match_cfg)
    res.total.backward()
    assert torch.equal(idx, torch.stack(ref_idx)), "matched indices differ from torchvision's Matcher"
    stats = {}
    for term in ("classification", "bbox_regression"):
        stats[term] = tl.rel_diff(res[term], ref[term])
        assert stats[term] <= TOL, (term, float(res[term]), float(ref[term]))
    stats["grad_cls"] = tl.rel_diff(tl.grads(c2), ref_g[0])
    stats["grad_reg"] = tl.rel_diff(tl.grads(r2), ref_g[1])
    assert stats["grad_cls"] <= TOL and stats["grad_reg"] <= TOL, stats
    assert float(res.diagnostics["num_fg"]) == float(sum(int((i >= 0).sum()) for i in ref_idx))
    assert float(res.diagnostics["num_ignored"]) == float(sum(int((i == -2).sum()) for i in ref_idx))
    return stats


@pytest.mark.parametrize(
    "counts",
    [[3], [5, 0], [0, 0], [1, 12, 4], [40, 0, 2, 25, 7]],
    ids=["B1", "B2-empty", "all-empty", "B3", "B5-crowded"],
)
def test_parity_small(counts):
    _compare(counts, crowded=True, seed=len(counts))


@pytest.mark.parametrize("box_loss", ["smooth_l1", "giou", "diou", "ciou"])
def test_parity_box_losses(box_loss):
    _compare([6, 0, 11], box_loss=box_loss, seed=3)


@pytest.mark.parametrize(
    "match_cfg",
    [
        {"allow_low_quality_matches": False},
        {"fg_iou_thresh": 0.5, "bg_iou_thresh": 0.5},
        {"fg_iou_thresh": 0.7, "bg_iou_thresh": 0.3},
        {"fg_iou_thresh": 0.0, "bg_iou_thresh": 0.0},
    ],
    ids=["no-low-quality", "equal-thresholds", "wide", "zero"],
)
def test_parity_matcher_settings(match_cfg):
    _compare([4, 9], seed=5, crowded=True, **match_cfg)


def test_parity_anchor_list_input():
    _compare([4, 0, 9], seed=7, anchors_as_list=True)


def test_parity_per_image_anchors():
    """Different anchors per image (a list of distinct tensors) take the batched (B, A, 4) path."""
    cls, reg, anchors, gt = tl.make_batch([5, 8], seed=11)
    g = torch.Generator().manual_seed(1)
    per_image = [anchors + 3.0 * torch.rand(anchors.shape[0], 1, generator=g) for _ in range(2)]
    ref, ref_idx = tl.torchvision_loss(cls, reg, per_image, gt)
    _, res, idx = _ours(cls, reg, per_image, gt)
    assert torch.equal(idx, torch.stack(ref_idx))
    for term in ("classification", "bbox_regression"):
        assert tl.rel_diff(res[term], ref[term]) <= TOL


def test_parity_full_scale_640():
    """torchvision's default AnchorGenerator at 640 x 640 (76,725 anchors), C = 80, one empty image."""
    anchors, _ = tl.real_anchors(640)
    assert anchors.shape == (76725, 4)
    stats = _compare([12, 0, 30], image=640, num_classes=80, seed=21, crowded=True)
    assert all(v <= TOL for v in stats.values())


def test_levels_and_single_tensor_agree():
    cls, reg, anchors, gt = tl.make_batch([3, 6], seed=2)
    _, a, _ = _ours(cls, reg, anchors, gt)
    c2, r2 = tl.fresh(cls), tl.fresh(reg)
    _, b, _ = _ours(torch.cat(c2, 1), torch.cat(r2, 1), anchors, gt)
    a.total.backward()
    b.total.backward()
    for term in a:
        assert torch.allclose(a[term], b[term], rtol=1e-6, atol=0)
    assert torch.allclose(tl.grads(cls), tl.grads(c2), rtol=1e-6, atol=1e-12)


def test_float64_matches_torchvision_tightly():
    cls, reg, anchors, gt = tl.make_batch([5, 0, 9], seed=4, dtype=torch.float64)
    ref, ref_idx = tl.torchvision_loss(cls, reg, anchors, gt)
    _, res, idx = _ours(tl.fresh(cls), tl.fresh(reg), anchors, gt)
    assert torch.equal(idx, torch.stack(ref_idx))
    for term in ("classification", "bbox_regression"):
        assert res[term].dtype == torch.float64
        assert tl.rel_diff(res[term], ref[term]) <= 1e-12


def _manual_reference(
    cls,
    reg,
    anchors,
    gt,
    idx,
    *,
    alpha,
    gamma,
    box,
    weights=(1.0, 1.0, 1.0, 1.0),
    beta=1.0,
    normalizer="image",
):
    """Per-image reference built from torchvision's pieces, for fields torchvision does not expose."""
    logits, deltas = torch.cat(cls, 1), torch.cat(reg, 1)
    coder = BoxCoder(weights)
    cls_sum, box_sum, fg_total, cls_terms, box_terms = 0.0, 0.0, 0, [], []
    for i, target in enumerate(gt):
        m = idx[i]
        fg = m >= 0
        onehot = torch.zeros_like(logits[i])
        onehot[fg, target["labels"][m[fg]]] = 1.0
        valid = m != -2
        c = sigmoid_focal_loss(logits[i][valid], onehot[valid], alpha=alpha, gamma=gamma, reduction="sum")
        t = coder.encode_single(target["boxes"][m[fg]], anchors[fg])
        fn = (
            F.l1_loss
            if box == "l1"
            else lambda a, b, reduction: F.smooth_l1_loss(a, b, reduction=reduction, beta=beta)
        )
        r = fn(deltas[i][fg], t, reduction="sum")
        n = int(fg.sum())
        cls_terms.append(c / max(1, n))
        box_terms.append(r / max(1, n))
        cls_sum, box_sum, fg_total = cls_sum + c, box_sum + r, fg_total + n
    if normalizer == "image":
        return sum(cls_terms) / len(gt), sum(box_terms) / len(gt)
    return cls_sum / max(1, fg_total), box_sum / max(1, fg_total)


@pytest.mark.parametrize(
    "cfg",
    [
        {"alpha": 0.5, "gamma": 1.5},
        {"alpha": -1.0, "gamma": 0.0},
        {"box_loss": "smooth_l1", "beta": 0.11},
        {"bbox_weights": (10.0, 10.0, 5.0, 5.0)},
        {"normalizer": "batch"},
    ],
    ids=["alpha-gamma", "no-alpha-ce", "smooth-l1-beta", "bbox-weights", "batch-normalizer"],
)
def test_fields_against_manual_reference(cfg):
    cls, reg, anchors, gt = tl.make_batch([4, 0, 10], seed=9)
    _, res, idx = _ours(cls, reg, anchors, gt, **cfg)
    want = _manual_reference(
        cls,
        reg,
        anchors,
        gt,
        idx,
        alpha=cfg.get("alpha", 0.25),
        gamma=cfg.get("gamma", 2.0),
        box=cfg.get("box_loss", "l1"),
        weights=cfg.get("bbox_weights", (1.0, 1.0, 1.0, 1.0)),
        beta=cfg.get("beta", 1.0),
        normalizer=cfg.get("normalizer", "image"),
    )
    assert tl.rel_diff(res["classification"], want[0]) <= TOL
    assert tl.rel_diff(res["bbox_regression"], want[1]) <= TOL


def test_functional_returns_matches_and_counts():
    cls, reg, anchors, gt = tl.make_batch([3, 0], seed=1)
    out = retinanet_loss(cls, reg, anchors, [g["boxes"] for g in gt], [g["labels"] for g in gt])
    assert out.matches.shape == (2, anchors.shape[0]) and out.matches.dtype == torch.int64
    assert float(out.num_fg) == float((out.matches >= 0).sum())
    assert bool((out.matches[1] == -1).all())


def test_gradcheck_float64_tiny():
    """Analytic gradients (focal custom backward, box term) against finite differences."""
    cls, reg, anchors, gt = tl.make_batch([2, 1], image=32, num_classes=2, seed=3, dtype=torch.float64)
    crit = RetinaNetLoss()
    keep = 40  # first anchors only, to keep gradcheck fast
    anchors = anchors[:keep]
    c = torch.cat([t.detach() for t in cls], 1)[:, :keep].clone().requires_grad_()
    r = torch.cat([t.detach() for t in reg], 1)[:, :keep].clone().requires_grad_()
    gt = [
        {"boxes": torch.tensor([[0.0, 0.0, 14.0, 20.0]], dtype=torch.float64), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[2.0, 3.0, 30.0, 12.0]], dtype=torch.float64), "labels": torch.tensor([0])},
    ]

    def f(c, r):
        return crit({"cls_logits": c, "bbox_regression": r, "anchors": anchors}, {"gt": gt}).total

    assert torch.autograd.gradcheck(f, (c, r), eps=1e-6, atol=1e-7, fast_mode=True)
