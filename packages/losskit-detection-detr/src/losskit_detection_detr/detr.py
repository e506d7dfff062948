# SPDX-License-Identifier: Apache-2.0
"""The RT-DETR set criterion (``detr_loss``): Hungarian matching, then varifocal/focal/CE and box terms
for the final decoder layer, every auxiliary output set and every denoising layer.

Reference: Zhao et al., "DETRs Beat YOLOs on Real-time Object Detection", CVPR 2024
(https://github.com/lyuwenyu/RT-DETR, ``rtdetr_pytorch/src/zoo/rtdetr/rtdetr_criterion.py`` and
``matcher.py``), as NetsPresso Trainer's ``detr_loss`` uses it; Carion et al., "End-to-End Object
Detection with Transformers", ECCV 2020.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from losskit import Criterion, InputError, LossTerms, option
from losskit.checks import fmt_shape, get_box_targets, get_img_size, value_checks_enabled
from losskit.dist import global_mean
from losskit.tensors import autocast_off, graph_zero
from losskit_detection_detr._example import make_example
from losskit_detection_detr._match import NAME, hungarian, iou_giou, pair_cost, xyxy
from losskit_ops import sigmoid_focal_loss_indexed

__all__ = [
    "CostWeights",
    "DetrLoss",
    "DetrLossConfig",
    "LossWeights",
    "MatcherConfig",
    "Matches",
    "detr_loss",
    "detr_match",
]

LossKind = Literal["vfl", "focal", "boxes", "labels"]
#: The terms each loss gives, and the ``weight_dict`` key that weights each term.
_TERMS: dict[str, tuple[tuple[str, str], ...]] = {
    "vfl": (("vfl", "loss_vfl"),),
    "focal": (("focal", "loss_focal"),),
    "boxes": (("bbox", "loss_bbox"), ("giou", "loss_giou")),
    "labels": (("labels", "loss_ce"),),
}
_GROUPS = ("", "aux_", "dn_")
#: Counts of matched pairs use this dtype whatever the input's.
_COUNT = torch.float32
Matches = dict[str, Any]


@dataclass(frozen=True)
class CostWeights:
    """Weights of the three matching costs (the matcher's ``weight_dict``)."""

    cost_class: float = option(2.0, ge=0.0, doc="Weight of the class cost.")
    cost_bbox: float = option(5.0, ge=0.0, doc="Weight of the L1 distance of (cx, cy, w, h).")
    cost_giou: float = option(2.0, ge=0.0, doc="Weight of -GIoU.")


@dataclass(frozen=True)
class MatcherConfig:
    """The Hungarian matcher (``matcher:`` in NetsPresso's block)."""

    type: Literal["HungarianMatcher"] = option(
        "HungarianMatcher", doc="The matcher; only HungarianMatcher (the name is never evaluated)."
    )
    weight_dict: CostWeights = option(CostWeights(), doc="Weights of the matching costs.")
    alpha: float = option(0.25, ge=0.0, le=1.0, doc="Focal alpha of the class cost.")
    gamma: float = option(2.0, ge=0.0, doc="Focal gamma of the class cost.")
    use_focal_loss: bool = option(
        True, doc="Focal class cost on sigmoid probabilities; false: -softmax probability."
    )
    eps: float = option(1e-8, ge=0.0, doc="Added inside the logs of the focal class cost.")

    def validate(self) -> list[tuple[str, str]]:
        w = self.weight_dict
        if w.cost_class == 0 and w.cost_bbox == 0 and w.cost_giou == 0:
            return [("weight_dict", "all three costs are 0; at least one must be > 0")]
        return []


@dataclass(frozen=True)
class LossWeights:
    """Weight of each loss term (``weight_dict``); keys absent from the YAML keep these defaults."""

    loss_vfl: float = option(1.0, ge=0.0, doc="Weight of the varifocal term.")
    loss_bbox: float = option(5.0, ge=0.0, doc="Weight of the L1 box term.")
    loss_giou: float = option(2.0, ge=0.0, doc="Weight of the GIoU term.")
    loss_focal: float = option(1.0, ge=0.0, doc="Weight of the focal term.")
    loss_ce: float = option(1.0, ge=0.0, doc="Weight of the cross-entropy ('labels') term.")


@dataclass(frozen=True)
class DetrLossConfig:
    """Fields of ``detr_loss``."""

    weight_dict: LossWeights = option(LossWeights(), doc="Weight of each term.")
    losses: tuple[LossKind, ...] = option(
        ("vfl", "boxes"), min_items=1, doc="Losses computed for every output set: vfl, focal, boxes, labels."
    )
    alpha: float = option(0.75, ge=0.0, le=1.0, doc="Alpha of the varifocal and focal losses.")
    gamma: float = option(2.0, ge=0.0, doc="Gamma of the varifocal and focal losses.")
    eos_coef: float = option(0.1, ge=0.0, doc="Cross-entropy weight of the no-object class ('labels').")
    matcher: MatcherConfig = option(MatcherConfig(), doc="The Hungarian matcher.")
    num_classes: int | None = option(
        None, ge=1, doc="Number of classes C; null takes target['num_classes'] or the logits' count."
    )
    normalize_across_ranks: bool = option(
        True, doc="Average num_boxes over torch.distributed ranks (RT-DETR does; NetsPresso's port not)."
    )

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if len(set(self.losses)) != len(self.losses):
            problems.append(("losses", f"each loss may appear once, got {list(self.losses)}"))
        if "labels" in self.losses and ("vfl" in self.losses or "focal" in self.losses):
            problems.append(
                (
                    "losses",
                    "'labels' (softmax over C + 1 logits, the last one no-object) cannot be combined "
                    f"with 'vfl' or 'focal' (sigmoid over C logits); got {list(self.losses)}",
                )
            )
        return problems


_D = DetrLossConfig


# ----------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class _Outputs:
    """One group of output sets: logits ``(K, B, Q, C)`` and boxes ``(K, B, Q, 4)`` in the work dtype."""

    logits: Tensor
    boxes: Tensor
    leaves: tuple[Tensor, ...]  # the caller's tensors, for graph-keeping zeros


@dataclass(frozen=True)
class _Gts:
    boxes: Tensor  # (B, N, 4) normalised (cx, cy, w, h); invalid and padded rows hold a centred box
    labels: Tensor  # (B, N) int64; invalid and padded rows hold 0
    valid: Tensor  # (B, N) bool
    counts: tuple[int, ...]
    invalid: Tensor  # () float32: gts left out of matching


@dataclass(frozen=True)
class _Batch:
    main: _Outputs  # final layer, then the aux sets
    num_aux: int
    dn: _Outputs | None
    dn_positive: tuple[Tensor, ...] | None
    dn_groups: int
    gts: _Gts
    num_classes: int  # C: classes without the no-object logit
    work: torch.dtype


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _float_tensor(value: Any, where: str, expected: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise InputError(NAME, where, f"expected a tensor {expected}, got {type(value).__name__}")
    if not value.is_floating_point():
        raise InputError(NAME, where, f"expected a floating-point tensor {expected}, got {value.dtype}")
    return value


def _check_like(t: Tensor, where: str, shape: tuple[int, ...], ref: Tensor, ref_key: str) -> None:
    if tuple(t.shape) != shape:
        raise InputError(NAME, where, f"expected shape {fmt_shape(shape)}, got {fmt_shape(t.shape)}")
    if t.device != ref.device:
        raise InputError(NAME, where, f"is on {t.device} but {ref_key} is on {ref.device}")


def _set_list(out: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    value = out.get(key)
    if value is None:
        return []
    where = f"out[{key!r}]"
    if isinstance(value, (str, bytes, Mapping, Tensor)) or not isinstance(value, Sequence):
        raise InputError(
            NAME,
            where,
            f"expected a list of {{'pred_logits', 'pred_boxes'}} dicts, got {type(value).__name__}",
        )
    for i, item in enumerate(value):
        if not isinstance(item, Mapping) or not {"pred_logits", "pred_boxes"} <= set(item):
            got = sorted(item) if isinstance(item, Mapping) else type(item).__name__
            raise InputError(
                NAME, f"{where}[{i}]", f"expected a dict with 'pred_logits', 'pred_boxes', got {got}"
            )
    return list(value)


def _group(
    sets: list[tuple[str, Tensor, Tensor]], batch: int, c: int, ref: Tensor, work: torch.dtype
) -> _Outputs:
    """Check and stack output sets ``(key, logits, boxes)``; all share B, C and the first set's Q."""
    queries = -1
    for key, logits, boxes in sets:
        at_logits, at_boxes = f"{key}['pred_logits']", f"{key}['pred_boxes']"
        _float_tensor(logits, at_logits, "(B, Q, C)")
        _float_tensor(boxes, at_boxes, "(B, Q, 4)")
        if logits.dim() != 3:
            raise InputError(NAME, at_logits, f"expected shape (B, Q, C), got {fmt_shape(logits.shape)}")
        queries = int(logits.shape[1]) if queries < 0 else queries
        _check_like(logits, at_logits, (batch, queries, c), ref, "out['pred']")
        _check_like(boxes, at_boxes, (batch, queries, 4), ref, "out['pred']")
    return _stack(sets, work)


def _stack(sets: list[tuple[str, Tensor, Tensor]], work: torch.dtype) -> _Outputs:
    logits = torch.stack([s[1].to(work) for s in sets])
    boxes = torch.stack([s[2].to(work) for s in sets])
    return _Outputs(logits, boxes, tuple(t for s in sets for t in (s[1], s[2])))


def _num_classes(
    pred: Tensor, target: Mapping[str, Any], losses: Sequence[str], configured: int | None
) -> int:
    logits = int(pred.shape[2]) - 4
    given = target.get("num_classes")
    if given is not None and not _is_int(given):
        raise InputError(NAME, "target['num_classes']", f"expected an int, got {given!r}")
    c = configured if configured is not None else given
    extra = 1 if "labels" in losses else 0
    if c is None:
        if extra:
            raise InputError(
                NAME,
                "target['num_classes']",
                "missing; 'labels' needs the number of classes C to tell the no-object logit apart: "
                "pass target['num_classes'] or set num_classes in the config",
            )
        return logits
    if given is not None and configured is not None and given != configured:
        raise InputError(NAME, "target['num_classes']", f"{given} differs from the config's num_classes {c}")
    if logits != c + extra:
        if extra:
            raise InputError(
                NAME,
                "out['pred']",
                f"'labels' needs C + 1 = {c + 1} class logits (the last is no-object) after the 4 box "
                f"channels, got {logits} (shape {fmt_shape(pred.shape)}); add a no-object logit to the "
                "head, or use 'vfl' or 'focal', which take C logits",
            )
        raise InputError(
            NAME,
            "out['pred']",
            f"expected 4 + C = {c + 4} channels (C = {c}), got shape {fmt_shape(pred.shape)}",
        )
    return c


def _dn_meta(out: Mapping[str, Any], batch: int, counts: tuple[int, ...]) -> tuple[tuple[Tensor, ...], int]:
    meta = out.get("dn_meta")
    where = "out['dn_meta']"
    if not isinstance(meta, Mapping):
        raise InputError(
            NAME,
            where,
            f"expected a dict with 'dn_positive_idx', 'dn_num_group' since out['dn_aux_pred'] "
            f"is given, got {type(meta).__name__}",
        )
    for key in ("dn_positive_idx", "dn_num_group"):
        if key not in meta:
            raise InputError(NAME, f"{where}[{key!r}]", f"missing; the dict has keys {sorted(meta)}")
    groups = meta["dn_num_group"]
    if isinstance(groups, Tensor) and groups.numel() == 1 and not groups.is_floating_point():
        groups = int(groups)  # a host read only if the caller chose a tensor here
    if not _is_int(groups) or groups < 1:
        raise InputError(NAME, f"{where}['dn_num_group']", f"expected an int >= 1, got {groups!r}")
    positive = meta["dn_positive_idx"]
    if isinstance(positive, Tensor) or not isinstance(positive, Sequence) or len(positive) != batch:
        raise InputError(
            NAME, f"{where}['dn_positive_idx']", f"expected a tuple of {batch} int64 tensors (one per image)"
        )
    for i, (idx, n) in enumerate(zip(positive, counts)):
        at = f"{where}['dn_positive_idx'][{i}]"
        if (
            not isinstance(idx, Tensor)
            or idx.dim() != 1
            or idx.is_floating_point()
            or idx.dtype == torch.bool
        ):
            raise InputError(NAME, at, "expected a 1-D integer tensor")
        if idx.shape[0] != n * groups:
            raise InputError(
                NAME,
                at,
                f"expected {n * groups} entries (dn_num_group {groups} x {n} gts of image {i}), got {idx.shape[0]}",
            )
    return tuple(positive), groups


def _gts(target: Mapping[str, Any], batch: int, c: int, img: tuple[float, float], ref: Tensor) -> _Gts:
    boxes_list, labels_list = get_box_targets(target, criterion=NAME, batch=batch, batch_of="out['pred']")
    device = ref.device
    for i, (boxes, labels) in enumerate(zip(boxes_list, labels_list)):
        where = f"target['gt'][{i}]"
        for name, t in (("boxes", boxes), ("labels", labels)):
            if t.device != device:
                raise InputError(
                    NAME, f"{where}[{name!r}]", f"is on {t.device} but out['pred'] is on {device}"
                )
        _value_check_gt(boxes, labels, where, c)
    counts = tuple(int(b.shape[0]) for b in boxes_list)
    n = max(counts, default=0)
    h, w = img
    if n == 0:
        empty = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        return _Gts(
            torch.zeros(batch, 0, 4, device=device),
            torch.zeros(batch, 0, dtype=torch.int64, device=device),
            empty,
            counts,
            torch.zeros((), device=device),
        )
    boxes = pad_sequence([b.to(torch.float32) for b in boxes_list], batch_first=True)
    labels = pad_sequence([lb.to(torch.int64) for lb in labels_list], batch_first=True)
    present = pad_sequence([torch.ones_like(lb, dtype=torch.bool) for lb in labels_list], batch_first=True)
    ok = (
        present
        & torch.isfinite(boxes).all(-1)
        & (boxes[..., 2] >= boxes[..., 0])
        & (boxes[..., 3] >= boxes[..., 1])
        & (labels >= 0)
        & (labels < c)
    )
    # normalised (cx, cy, w, h) in a new tensor (the caller's boxes are never touched); Python scalars,
    # so no host-to-device copy
    x1, y1, x2, y2 = boxes.unbind(-1)
    cxcywh = torch.stack(((x1 + x2) / (2 * w), (y1 + y2) / (2 * h), (x2 - x1) / w, (y2 - y1) / h), dim=-1)
    safe = torch.where(ok[..., None], cxcywh, 0.5)  # a centred box (0.5, 0.5, 0.5, 0.5) where invalid
    return _Gts(
        safe,
        torch.where(ok, labels, 0),
        ok,
        counts,
        (present & ~ok).sum().to(_COUNT),
    )


def _value_check_gt(boxes: Tensor, labels: Tensor, where: str, c: int) -> None:
    if boxes.numel() and value_checks_enabled(boxes):
        finite = torch.isfinite(boxes).all(1)
        if not bool(finite.all()):
            j = int((~finite).nonzero()[0, 0])
            raise InputError(NAME, f"{where}['boxes'][{j}]", f"non-finite box {boxes[j].tolist()}")
        bad = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
        if bool(bad.any()):
            j = int(bad.nonzero()[0, 0])
            raise InputError(
                NAME,
                f"{where}['boxes'][{j}]",
                f"inverted box {boxes[j].tolist()} (x2 < x1 or y2 < y1); expected xyxy with x2 >= x1, y2 >= y1",
            )
    if labels.numel() and value_checks_enabled(labels):
        out_of_range = (labels < 0) | (labels >= c)
        if bool(out_of_range.any()):
            j = int(out_of_range.nonzero()[0, 0])
            raise InputError(
                NAME, f"{where}['labels'][{j}]", f"class {int(labels[j])} is out of range; expected [0, {c})"
            )


def _check_finite(outputs: _Outputs, keys: Sequence[str]) -> None:
    if not value_checks_enabled(outputs.logits):
        return
    # the sum is non-finite when any value is (or on overflow): one sum per group, then look closer
    if bool(torch.isfinite(outputs.logits.sum() + outputs.boxes.sum())):
        return
    for k, key in enumerate(keys):
        # the sum is non-finite when any value is (or on overflow: then look closer)
        for name, t in (("pred_logits", outputs.logits[k]), ("pred_boxes", outputs.boxes[k])):
            if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
                where = key if key == "out['pred']" else f"{key}[{name!r}]"
                raise InputError(NAME, where, "contains non-finite values (nan or inf)")


def _prepare(out: Any, target: Any, *, losses: Sequence[str], num_classes: int | None) -> _Batch:
    if not isinstance(out, Mapping):
        raise InputError(NAME, "out", f"expected a mapping with key 'pred', got {type(out).__name__}")
    if not isinstance(target, Mapping):
        raise InputError(
            NAME, "target", f"expected a mapping with keys 'gt', 'img_size', got {type(target).__name__}"
        )
    if "pred" not in out:
        keys = ", ".join(repr(k) for k in out) or "none"
        raise InputError(NAME, "out['pred']", f"missing; out has keys {keys}; expected: (B, Q, 4 + C)")
    pred = _float_tensor(out["pred"], "out['pred']", "(B, Q, 4 + C)")
    if pred.dim() != 3 or pred.shape[2] < 5:
        raise InputError(
            NAME, "out['pred']", f"expected shape (B, Q, 4 + C) with C >= 1, got {fmt_shape(pred.shape)}"
        )
    c = _num_classes(pred, target, losses, num_classes)
    logit_count = int(pred.shape[2]) - 4
    batch = int(pred.shape[0])
    work = torch.float64 if pred.dtype == torch.float64 else torch.float32
    aux = _set_list(out, "aux_pred")
    aux_sets = [(f"out['aux_pred'][{i}]", a["pred_logits"], a["pred_boxes"]) for i, a in enumerate(aux)]
    if aux_sets:
        _group([("out['pred']", pred[..., 4:], pred[..., :4]), *aux_sets], batch, logit_count, pred, work)
    main = _stack([("out['pred']", pred[..., 4:], pred[..., :4]), *aux_sets], work)
    sets = [("out['pred']", pred, pred), *aux_sets]
    img = get_img_size(target, criterion=NAME)
    gts = _gts(target, batch, c, img, pred)
    _check_finite(main, [s[0] for s in sets])
    dn_list = _set_list(out, "dn_aux_pred")
    dn, positive, groups = None, None, 0
    if dn_list:
        positive, groups = _dn_meta(out, batch, gts.counts)
        for i, idx in enumerate(positive):
            if idx.device != pred.device:
                raise InputError(
                    NAME,
                    f"out['dn_meta']['dn_positive_idx'][{i}]",
                    f"is on {idx.device} but out['pred'] is on {pred.device}",
                )
        dn_sets = [
            (f"out['dn_aux_pred'][{i}]", d["pred_logits"], d["pred_boxes"]) for i, d in enumerate(dn_list)
        ]
        dn = _group(dn_sets, batch, logit_count, pred, work)
        _check_finite(dn, [s[0] for s in dn_sets])
        if value_checks_enabled(pred):
            n_dn = int(dn.logits.shape[2])
            for i, idx in enumerate(positive):
                if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_dn):
                    raise InputError(
                        NAME,
                        f"out['dn_meta']['dn_positive_idx'][{i}]",
                        f"indices must lie in [0, {n_dn}) (the denoising queries), got "
                        f"[{int(idx.min())}, {int(idx.max())}]",
                    )
    return _Batch(main, len(aux), dn, positive, groups, gts, c, work)


# ---------------------------------------------------------------------------------------------- matching


def _hungarian(batch: _Batch, matcher: MatcherConfig) -> Tensor:
    """Matched query of each gt ``(S, B, N)`` for the final layer and the aux sets (``-1``: none)."""
    logits, boxes, gts = batch.main.logits, batch.main.boxes, batch.gts
    s, b, q, _ = logits.shape
    n = gts.labels.shape[1]
    device = logits.device
    if n == 0 or q == 0 or b == 0:
        return torch.full((s, b, n), -1, dtype=torch.int64, device=device)
    # the image and the slot of each gt, from Python counts (no host-to-device copy)
    image = torch.cat(
        [torch.full((c,), i, dtype=torch.int64, device=device) for i, c in enumerate(gts.counts)]
    )
    slot = torch.cat([torch.arange(c, device=device) for c in gts.counts])
    w = matcher.weight_dict
    with torch.no_grad():
        cost = pair_cost(
            logits.detach().float(),
            boxes.detach().float(),
            gts.boxes[image, slot],
            gts.labels[image, slot],
            image,
            cost_class=w.cost_class,
            cost_bbox=w.cost_bbox,
            cost_giou=w.cost_giou,
            alpha=matcher.alpha,
            gamma=matcher.gamma,
            eps=matcher.eps,
            use_focal_loss=matcher.use_focal_loss,
        )  # (S, G, Q)
        flags = gts.valid[image, slot].to(cost.dtype)[None, :, None].expand(s, -1, 1)
        rows = hungarian(torch.cat((cost, flags), dim=2), list(gts.counts))  # (S, G)
        assign = torch.full((s, b, n), -1, dtype=torch.int64, device=device)
        assign[:, image, slot] = rows
        return assign


def _dn_pairs(batch: _Batch, positive: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """The fixed denoising pairs ``(query, gt, ok)``, each ``(B, G * N)``: ``positive[i] <-> tile(arange(n_i), G)``."""
    device = batch.gts.valid.device
    gt_idx = [torch.arange(n, device=device).repeat(batch.dn_groups) for n in batch.gts.counts]
    query = pad_sequence([p.to(torch.int64) for p in positive], batch_first=True)
    gt = pad_sequence(gt_idx, batch_first=True)
    present = pad_sequence([torch.ones_like(g, dtype=torch.bool) for g in gt_idx], batch_first=True)
    ok = present & batch.gts.valid.gather(1, gt) if gt.shape[1] else present
    # an index outside the denoising queries (checked when value checks run) drops its pair
    n_dn = batch.dn.logits.shape[2] if batch.dn is not None else 0
    inside = (query >= 0) & (query < n_dn)
    return query.clamp(0, max(n_dn - 1, 0)), gt, ok & inside


# ------------------------------------------------------------------------------------------------ losses


def _sums(
    outputs: _Outputs,
    query: Tensor,
    gt: Tensor,
    ok: Tensor,
    gts: _Gts,
    cfg: DetrLossConfig,
) -> dict[str, Tensor]:
    """Per-set sums ``(K,)`` of each term over matched pairs ``(K, B, P)`` (unweighted, unnormalised;
    ``labels`` is the weighted mean cross-entropy of each set)."""
    losses, alpha, gamma = cfg.losses, cfg.alpha, cfg.gamma
    x, boxes = outputs.logits, outputs.boxes
    k, b, q, c = x.shape
    p = query.shape[2]
    work = x.dtype
    gt_boxes = gts.boxes.to(work)[None].expand(k, b, -1, 4).gather(2, gt[..., None].expand(k, b, p, 4))
    labels = gts.labels[None].expand(k, b, -1).gather(2, gt)
    pred_boxes = boxes.gather(2, query[..., None].expand(k, b, p, 4))
    out: dict[str, Tensor] = {}
    iou, giou = iou_giou(xyxy(pred_boxes), xyxy(gt_boxes))
    if "boxes" in losses:
        out["bbox"] = torch.where(ok[..., None], (pred_boxes - gt_boxes).abs(), 0.0).sum((1, 2, 3))
        out["giou"] = torch.where(ok, 1.0 - giou, 0.0).sum((1, 2))
    if "vfl" in losses:
        out["vfl"] = _varifocal(x, query * c + labels, ok, iou.detach(), alpha, gamma)
    if "focal" in losses:
        # the class of each query: its matched gt's, or -1 (an all-zero one-hot row)
        slot = torch.where(ok, query, q)
        cls = torch.full((k, b, q + 1), -1, dtype=torch.int64, device=x.device)
        cls = cls.scatter_(2, slot, torch.where(ok, labels, -1))[..., :q]
        each = sigmoid_focal_loss_indexed(
            x.reshape(-1, c), cls.reshape(-1), alpha=alpha, gamma=gamma, reduction="none"
        )
        out["focal"] = each.view(k, -1).sum(1)
    if "labels" in losses:
        no_object = c - 1
        slot = torch.where(ok, query, q)
        cls = torch.full((k, b, q + 1), no_object, dtype=torch.int64, device=x.device)
        cls = cls.scatter_(2, slot, torch.where(ok, labels, no_object))[..., :q]
        nll = -x.log_softmax(-1).gather(3, cls[..., None])[..., 0]
        w = torch.where(cls == no_object, cfg.eos_coef, 1.0).to(work)
        out["labels"] = (w * nll).sum((1, 2)) / w.sum((1, 2)).clamp(min=torch.finfo(work).tiny)
    return out


def _softplus(x: Tensor) -> Tensor:
    """``log(1 + exp(x))`` as ``max(x, 0) + log(1 + exp(-|x|))``: vectorised ``exp`` and ``log``, several
    times faster on CPU than torch's ``softplus``/``log1p`` kernels. Where ``exp(-|x|)`` is small the
    ``1 +`` rounds (absolute error under 6e-8 per element); for negatives, which is where this is used,
    the varifocal weight ``sigmoid(x)^gamma`` scales that error down further."""
    return torch.log(torch.exp(-x.abs()).add_(1.0)).add_(x.clamp(min=0))


class _Varifocal(torch.autograd.Function):
    """Per-set varifocal sums ``(K,)`` of logits ``x`` ``(K, B, Q, C)``, with RT-DETR's weighting:
    ``sum weight * BCE(x, t)``, ``t = iou * onehot``, ``weight = alpha * sigmoid(x)^gamma * (1 - onehot)
    + t``, the weight and ``t`` without gradient.

    Computed densely as if every logit were a negative (``alpha * s^gamma * softplus(x)``), then corrected at the P matched entries; the gradient is written in one buffer
    (``alpha * s^(gamma + 1)``, then ``t (s - t)`` at the positives), with none of the one-hot, target
    and weight tensors of the plain formula.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, flat: Tensor, ok: Tensor, iou: Tensor, alpha: float, gamma: float
    ) -> Tensor:
        k = x.shape[0]
        s = torch.sigmoid(x)
        w = torch.square(s) if gamma == 2.0 else torch.pow(s, gamma)
        dense = (w * _softplus(x)).view(k, -1).sum(1) * alpha
        index = torch.where(ok, flat, 0).view(k, -1)
        xp = x.view(k, -1).gather(1, index)
        sp_p = F.softplus(xp)  # exact at the few positives
        w_p, s_p = w.view(k, -1).gather(1, index), s.view(k, -1).gather(1, index)
        t = torch.where(ok.view(k, -1), iou.view(k, -1).to(x.dtype), 0.0)
        correction = t * (sp_p - xp * t) - alpha * w_p * sp_p
        ctx.save_for_backward(s, index, torch.where(ok.view(k, -1), t * (s_p - t) - alpha * w_p * s_p, 0.0))
        ctx.alpha, ctx.gamma = alpha, gamma
        return dense + torch.where(ok.view(k, -1), correction, 0.0).sum(1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        s, index, at_pos = ctx.saved_tensors
        k = s.shape[0]
        # torch.pow(s, 3) is not vectorised on CPU (about 20x slower than two multiplications)
        g = torch.square(s).mul_(s) if ctx.gamma == 2.0 else torch.pow(s, ctx.gamma + 1)
        g = g.mul_((grad * ctx.alpha).view(k, *([1] * (s.dim() - 1))))
        g.view(k, -1).scatter_add_(1, index, at_pos * grad[:, None])
        return g, None, None, None, None, None


def _varifocal(x: Tensor, flat: Tensor, ok: Tensor, iou: Tensor, alpha: float, gamma: float) -> Tensor:
    """Per-set varifocal sums ``(K,)`` of logits ``(K, B, Q, C)`` whose positives are the matched
    ``(query * C + label)`` entries ``flat`` ``(K, B, P)`` (where ``ok``) with targets ``iou``."""
    _, b, q, c = x.shape
    offset = torch.arange(b, device=x.device)[:, None] * (q * c)  # flat index within the set
    result: Tensor = _Varifocal.apply(x.contiguous(), flat + offset, ok, iou, alpha, gamma)
    return result


def _term_names(losses: Sequence[str]) -> tuple[str, ...]:
    return tuple(f"{g}{name}" for g in _GROUPS for loss in losses for name, _ in _TERMS[loss])


def _loss_of_batch(batch: _Batch, cfg: DetrLossConfig) -> LossTerms:
    gts = batch.gts
    device = gts.valid.device
    num_gt = gts.valid.sum().to(_COUNT)
    num_boxes = global_mean(num_gt, enabled=cfg.normalize_across_ranks, min=1.0)
    zero = graph_zero(*batch.main.leaves).to(batch.work)  # float32 (float64 for float64 inputs)
    terms: dict[str, Tensor] = {}

    def add(prefix: str, sums: dict[str, Tensor] | None, norm: Tensor) -> None:
        for loss in cfg.losses:
            for name, key in _TERMS[loss]:
                if sums is None:
                    terms[prefix + name] = zero
                    continue
                value = sums[name].sum()
                if name != "labels":
                    value = value / norm.to(value.dtype)
                terms[prefix + name] = getattr(cfg.weight_dict, key) * value

    assign = _hungarian(batch, cfg.matcher)  # (S, B, N)
    s, b, n = assign.shape
    gt_index = torch.arange(n, device=device).expand(s, b, n)
    sums = _sums(batch.main, assign.clamp(min=0), gt_index, assign >= 0, gts, cfg)
    add("", {k: v[:1] for k, v in sums.items()}, num_boxes)
    add("aux_", {k: v[1:] for k, v in sums.items()} if batch.num_aux else None, num_boxes)
    if batch.dn is not None and batch.dn_positive is not None:
        query, gt, ok = _dn_pairs(batch, batch.dn_positive)
        layers = batch.dn.logits.shape[0]
        expand = [t[None].expand(layers, *t.shape) for t in (query, gt, ok)]
        dn_sums = _sums(batch.dn, expand[0], expand[1], expand[2], gts, cfg)
        add("dn_", dn_sums, num_boxes * batch.dn_groups)
    else:
        add("dn_", None, num_boxes)
    diagnostics = {
        "num_boxes": num_boxes.detach(),
        "invalid_targets": gts.invalid.detach(),
        "dn_groups": torch.full((), float(batch.dn_groups), device=device),
    }
    return LossTerms({name: terms[name] for name in _term_names(cfg.losses)}, diagnostics)


def _pairs_per_image(assign: Tensor) -> list[tuple[Tensor, Tensor]]:
    """``(query, gt)`` int64 per image from an ``(B, N)`` assignment, queries ascending (as scipy)."""
    result = []
    for row in assign.cpu():
        gt = (row >= 0).nonzero()[:, 0]
        query = row[gt]
        order = query.argsort()
        result.append((query[order], gt[order]))
    return result


def _match(batch: _Batch, cfg: DetrLossConfig) -> Matches:
    with autocast_off(batch.gts.valid.device):
        assign = _hungarian(batch, cfg.matcher)
    sets = [_pairs_per_image(a) for a in assign]
    dn = None
    if batch.dn is not None and batch.dn_positive is not None:
        query, gt, ok = _dn_pairs(batch, batch.dn_positive)
        dn = [(qi[m].cpu(), gi[m].cpu()) for qi, gi, m in zip(query, gt, ok)]
    return {"main": sets[0], "aux": sets[1:], "dn": dn}


# ---------------------------------------------------------------------------------------------- public


def _config(**fields: Any) -> DetrLossConfig:
    config: DetrLossConfig = DetrLoss.make_config(**fields)
    return config


def detr_loss(
    out: Mapping[str, Any],
    target: Mapping[str, Any],
    *,
    weight_dict: LossWeights = _D.weight_dict,
    losses: Sequence[LossKind] = _D.losses,
    alpha: float = _D.alpha,
    gamma: float = _D.gamma,
    eos_coef: float = _D.eos_coef,
    matcher: MatcherConfig = _D.matcher,
    num_classes: int | None = _D.num_classes,
    normalize_across_ranks: bool = _D.normalize_across_ranks,
) -> LossTerms:
    """The RT-DETR set criterion of a batch.

    Args:
        out: ``"pred"`` ``(B, Q, 4 + C)``: ``(cx, cy, w, h)`` normalised to (0, 1) (after the sigmoid),
            then the C class logits of the last decoder layer; ``"aux_pred"`` (optional): list of
            ``{"pred_logits": (B, Q, C), "pred_boxes": (B, Q, 4)}`` (earlier decoder layers, then the
            encoder's top-k); ``"dn_aux_pred"`` (optional): such a list over the ``N_dn`` denoising
            queries, one per decoder layer, with ``"dn_meta"``: ``{"dn_positive_idx": B int64 tensors,
            "dn_num_group": G}``.
        target: ``"gt"``: B dicts ``{"boxes": (n_i, 4) xyxy in input pixels, "labels": (n_i,) int}``;
            ``"img_size"``: ``H = W`` or ``(H, W)``; ``"num_classes"`` (optional): C.
        weight_dict, losses, alpha, gamma, eos_coef, matcher, num_classes, normalize_across_ranks: the
            fields of :class:`DetrLossConfig`.

    Returns:
        :class:`losskit.LossTerms`: ``vfl``/``focal``/``labels``, ``bbox``, ``giou`` of the final layer,
        the same summed over the aux sets (``aux_*``) and over the denoising layers (``dn_*``), each
        multiplied by its ``weight_dict`` entry. Box and (vari)focal terms are divided by
        ``num_boxes = max(sum n_i, 1)`` (``num_boxes * G`` for denoising); ``labels`` is the weighted
        mean cross-entropy. Diagnostics: ``num_boxes``, ``invalid_targets``, ``dn_groups``.
    """
    cfg = _config(
        weight_dict=weight_dict,
        losses=tuple(losses),
        alpha=alpha,
        gamma=gamma,
        eos_coef=eos_coef,
        matcher=matcher,
        num_classes=num_classes,
        normalize_across_ranks=normalize_across_ranks,
    )
    return DetrLoss(cfg)(out, target)


def detr_match(
    out: Mapping[str, Any], target: Mapping[str, Any], *, matcher: MatcherConfig = _D.matcher
) -> Matches:
    """The matches :func:`detr_loss` uses; see :meth:`DetrLoss.match`."""
    return DetrLoss(matcher=matcher).match(out, target)


class DetrLoss(Criterion[DetrLossConfig]):
    """RT-DETR set criterion: Hungarian matching per output set, then varifocal (or focal, or
    cross-entropy) and L1 + GIoU box terms, for the final layer, the aux sets and the denoising layers.

    The matching cost of query q and gt j is ``cost_bbox * L1 + cost_class * focal class cost +
    cost_giou * (-GIoU)``, solved with scipy's ``linear_sum_assignment`` per image; the costs of every
    output set reach the host in one transfer per call (the only host synchronisation). Denoising
    queries use the fixed matching ``dn_positive_idx[i] <-> tile(arange(n_i), G)``. Terms are summed
    over their layers and already weighted: their sum is the loss. Box and (vari)focal terms are divided
    by ``num_boxes = max(sum n_i, 1)`` (averaged over ranks first when ``normalize_across_ranks``;
    ``num_boxes * G`` for denoising); ``labels`` is a weighted mean cross-entropy. Gt boxes are
    normalised by ``(W, H, W, H)`` and converted to ``(cx, cy, w, h)`` on a copy.

    Reference: Zhao et al., "DETRs Beat YOLOs on Real-time Object Detection", CVPR 2024
    (https://github.com/lyuwenyu/RT-DETR, ``rtdetr_pytorch/src/zoo/rtdetr/rtdetr_criterion.py``).
    """

    name = NAME
    Config = DetrLossConfig
    terms = _term_names(DetrLossConfig.losses)
    diagnostics = ("num_boxes", "invalid_targets", "dn_groups")
    inputs = {
        "pred": "(B, Q, 4 + C): (cx, cy, w, h) in (0, 1) after the sigmoid, then C class logits "
        "(C + 1 with 'labels', the last no-object)",
        "aux_pred": "optional list of {'pred_logits': (B, Q, C), 'pred_boxes': (B, Q, 4)}: earlier "
        "decoder layers, then the encoder's top-k",
        "dn_aux_pred": "optional list of {'pred_logits': (B, N_dn, C), 'pred_boxes': (B, N_dn, 4)}, "
        "one per decoder layer",
        "dn_meta": "{'dn_positive_idx': B int64 tensors, 'dn_num_group': G, 'dn_num_split': [N_dn, Q]} "
        "or None",
    }
    targets = {
        "gt": "list of B dicts {'boxes': (n_i, 4) float xyxy in input pixels, 'labels': (n_i,) int64 in [0, C)}",
        "img_size": "int or (H, W) of the network input; boxes are divided by (W, H, W, H)",
        "num_classes": "optional int C (needed by 'labels' unless num_classes is configured)",
    }

    def term_names(self) -> tuple[str, ...]:
        return _term_names(self.config.losses)

    def _batch(self, out: Any, target: Any) -> _Batch:
        return _prepare(out, target, losses=self.config.losses, num_classes=self.config.num_classes)

    def forward(self, out: Mapping[str, Any], target: Mapping[str, Any]) -> LossTerms:
        batch = self._batch(out, target)
        with autocast_off(batch.gts.valid.device):
            return _loss_of_batch(batch, self.config)

    @torch.no_grad()
    def match(self, out: Mapping[str, Any], target: Mapping[str, Any]) -> Matches:
        """The matches the loss uses, on the CPU.

        Returns:
            ``{"main": [(query_idx, gt_idx) per image], "aux": [one such list per aux set],
            "dn": [(dn query idx, gt_idx) per image] or None}``, int64 tensors, query indices ascending
            (scipy's order). Gts left out of matching (invalid boxes or labels) appear in none.
        """
        return _match(self._batch(out, target), self.config)

    def example(
        self,
        batch_size: int = 2,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """RT-DETR-shaped outputs: 3 decoder layers + the encoder's top-k over 20 queries, denoising
        with ``num_denoising = 10`` (``G = 10 // max n`` groups, RT-DETR's layout), C = 4 (or
        ``num_classes``; + 1 no-object logit with 'labels'), a 64x64 input, 0-5 boxes per image (at
        least one in the first)."""
        c = self.config.num_classes or 4
        extra = 1 if "labels" in self.config.losses else 0
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        out, target = make_example(
            batch_size,
            queries=20,
            classes=c,
            logits=c + extra,
            layers=3,
            num_denoising=10,
            img=64,
            generator=gen,
        )
        if extra:
            target["num_classes"] = c
        return _to(out, device), _to(target, device)


def _to(value: Any, device: torch.device | str | None) -> Any:
    """``value`` with every tensor moved to ``device``; model outputs stay leaves that require grad."""
    if isinstance(value, Tensor):
        moved = value.detach().to(device)
        return moved.requires_grad_(value.requires_grad)
    if isinstance(value, Mapping):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    return value
