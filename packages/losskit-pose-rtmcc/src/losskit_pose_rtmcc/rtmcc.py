# SPDX-License-Identifier: Apache-2.0
"""RTMPose's SimCC loss: Gaussian SimCC labels encoded from the keypoints, then a weighted KL divergence.

Reference: Jiang et al., "RTMPose: Real-Time Multi-Person Pose Estimation based on MMPose",
arXiv:2303.07399; Li et al., "SimCC: a Simple Coordinate Classification Perspective for Human Pose
Estimation", ECCV 2022 (arXiv:2107.03332). Semantics of mmpose's ``SimCCLabel`` (Gaussian smoothing)
and ``KLDiscretLoss``, as NetsPresso Trainer's ``rtmcc_loss`` fuses them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import Tensor

from losskit import Criterion, InputError, LossTerms, option
from losskit.checks import check_same_device, explain_non_finite, fmt_shape, get_tensor, value_checks_enabled
from losskit.dist import global_mean, is_distributed
from losskit.tensors import autocast_off
from losskit_pose_rtmcc._simcc import axis_labels, centre_range, cross_terms, gather_labels

__all__ = ["RTMCCLoss", "RTMCCLossConfig", "SimCCTargets", "rtmcc_loss", "simcc_bins", "simcc_encode"]

NAME = "rtmcc_loss"
VisibilityWeight = Literal["raw", "binary"]
Normalizer = Literal["keypoints", "instances_and_keypoints"]


@dataclass(frozen=True)
class RTMCCLossConfig:
    """Fields of ``rtmcc_loss``; the defaults are NetsPresso Trainer's constants."""

    input_size: tuple[int, int] = option(
        (256, 256),
        ge=1,
        doc="(w, h) of the input crop in pixels; the head predicts round(w * split_ratio) x bins, "
        "then round(h * split_ratio) y bins.",
    )
    sigma: tuple[float, float] = option(
        (5.66, 5.66), gt=0.0, doc="(sigma_x, sigma_y) of the Gaussian labels, in bins."
    )
    split_ratio: float = option(2.0, gt=0.0, doc="SimCC bins per input pixel.")
    beta: float = option(10.0, gt=0.0, doc="The predicted distribution is softmax(beta * pred).")
    label_softmax: bool = option(
        True, doc="Target softmax(label_beta * t) instead of the Gaussian label t itself."
    )
    label_beta: float = option(10.0, ge=0.0, doc="Scale of the labels in the label softmax.")
    use_target_weight: bool = option(
        True,
        doc="Weight each keypoint's KL by its keypoint weight; false weighs every keypoint 1 "
        "(those without a label too, against an all-zero t).",
    )
    normalize: bool = option(False, doc="Divide the Gaussian labels t by sigma * sqrt(2 pi).")
    visibility_weight: Literal["raw", "binary"] = option(
        "raw",
        doc="Weight of a labelled keypoint: 'raw' its visibility v (NetsPresso: visible 2, occluded 1), "
        "'binary' min(v, 1) (mmpose).",
    )
    normalizer: Literal["keypoints", "instances_and_keypoints"] = option(
        "keypoints",
        doc="Divide the weighted KL sum by K ('keypoints', as mmpose and NetsPresso: the loss grows "
        "with the batch) or by N * K ('instances_and_keypoints').",
    )
    mask: tuple[int, ...] | None = option(
        None, ge=0, doc="Keypoint indices whose loss is multiplied by mask_weight; null for none."
    )
    mask_weight: float = option(1.0, ge=0.0, doc="Factor on the loss of the keypoints in mask.")
    normalize_across_ranks: bool = option(
        False,
        doc="Under DDP, scale so that the averaged gradient is the whole global batch's: 'keypoints' "
        "multiplies by the world size, 'instances_and_keypoints' divides by the mean N over ranks.",
    )

    def validate(self) -> list[tuple[str, str]]:
        """Each axis must have at least one bin."""
        problems = []
        for axis, size in zip("wh", self.input_size):
            if round(size * self.split_ratio) < 1:
                problems.append(
                    (
                        "split_ratio",
                        f"round({axis} * split_ratio) = round({size} * {self.split_ratio}) is 0 bins; "
                        "allowed: at least 1 bin per axis",
                    )
                )
        return problems


_C = RTMCCLossConfig


class SimCCTargets(NamedTuple):
    """Encoded keypoints: ``centre`` ``(N, K, 2)`` SimCC bins ``round(xy * split_ratio)``, ``labelled``
    ``(N, K)`` (visible and with its 3-sigma window meeting the bins on both axes) and ``weight``
    ``(N, K)`` (0 where not labelled)."""

    centre: Tensor
    labelled: Tensor
    weight: Tensor


def simcc_bins(
    input_size: Sequence[int] = _C.input_size, split_ratio: float = _C.split_ratio
) -> tuple[int, int]:
    """``(W_x, W_y) = (round(w * split_ratio), round(h * split_ratio))``, rounding half to even."""
    return round(input_size[0] * split_ratio), round(input_size[1] * split_ratio)


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def simcc_encode(
    keypoints: Tensor,
    *,
    input_size: tuple[int, int] = _C.input_size,
    sigma: tuple[float, float] = _C.sigma,
    split_ratio: float = _C.split_ratio,
    visibility_weight: VisibilityWeight = _C.visibility_weight,
) -> SimCCTargets:
    """Encode keypoints as mmpose's ``SimCCLabel`` does (Gaussian smoothing), on the device.

    Args:
        keypoints: ``(N, K, 3)`` ``[x, y, v]`` in input-crop pixels, ``v`` the COCO visibility (0, 1, 2).

    Returns:
        ``centre = round(xy * split_ratio)`` (half to even, as numpy), float32 (float64 for float64
        keypoints); ``labelled``: ``v >= 0.5`` and ``-3 sigma - 1 <= centre < bins + 3 sigma`` on both axes
        (mmpose's in-bounds test; non-finite coordinates are not labelled); ``weight``: ``v``
        (``'raw'``) or ``min(v, 1)`` (``'binary'``) where labelled, else 0.
    """
    work = _work_dtype(keypoints)
    centre = torch.round(keypoints[..., :2].to(work) * split_ratio)
    vis = keypoints[..., 2].to(work)
    labelled = vis >= 0.5
    for axis, bins in enumerate(simcc_bins(input_size, split_ratio)):
        lo, hi = centre_range(bins, sigma[axis])
        c = centre[..., axis]
        labelled = labelled & (c >= lo) & (c <= hi)
    value = vis if visibility_weight == "raw" else vis.clamp(max=1.0)
    weight = torch.where(labelled, value, torch.zeros((), dtype=work, device=vis.device))
    return SimCCTargets(centre, labelled, weight)


def _bins_hint(total: int, input_size: tuple[int, int], split_ratio: float) -> str:
    """Input sizes ``[w, h]`` that give ``total`` bins: one side kept, or square."""
    wx, wy = simcc_bins(input_size, split_ratio)

    def side(target: int) -> int | None:
        guess = target / split_ratio
        for s in range(max(1, math.floor(guess) - 1), math.ceil(guess) + 2):
            if round(s * split_ratio) == target:
                return s
        return None

    found: list[tuple[int, int]] = []
    w = side(total - wy) if total > wy else None
    if w is not None:
        found.append((w, input_size[1]))
    h = side(total - wx) if total > wx else None
    if h is not None:
        found.append((input_size[0], h))
    s = side(total // 2) if total % 2 == 0 and total > 0 else None
    if s is not None:
        found.append((s, s))
    unique = list(dict.fromkeys(found))
    if not unique:
        return f"no integer input_size gives {total} bins with split_ratio {split_ratio}"
    sizes = " or ".join(f"[{a}, {b}]" for a, b in unique)
    return f"set input_size to {sizes} (w, h) to match"


def _check_inputs(pred: Tensor, keypoints: Tensor, input_size: tuple[int, int], split_ratio: float) -> None:
    if pred.dim() != 3:
        raise InputError(
            NAME, "out['pred']", f"expected (N, K, W_x + W_y) SimCC logits, got shape {fmt_shape(pred.shape)}"
        )
    if keypoints.dtype == torch.bool or keypoints.is_complex():
        raise InputError(
            NAME, "target['keypoints']", f"expected real [x, y, v] values, got {keypoints.dtype}"
        )
    n, k, total = pred.shape
    if keypoints.shape != (n, k, 3):
        raise InputError(
            NAME,
            "target['keypoints']",
            f"expected shape ({n}, {k}, 3) ([x, y, v] for the N, K of out['pred'] "
            f"{fmt_shape(pred.shape)}), got {fmt_shape(keypoints.shape)}",
        )
    check_same_device(NAME, ("out['pred']", pred), ("target['keypoints']", keypoints))
    wx, wy = simcc_bins(input_size, split_ratio)
    if total != wx + wy:
        raise InputError(
            NAME,
            "out['pred']",
            f"has {total} bins in its last dimension, but input_size [{input_size[0]}, {input_size[1]}] "
            f"with split_ratio {split_ratio} gives W_x + W_y = {wx} + {wy} = {wx + wy}; "
            + _bins_hint(total, input_size, split_ratio),
        )


def _check_values(keypoints: Tensor) -> None:
    """Finite visibilities, and finite coordinates for the labelled ones (v >= 0.5); reads values."""
    vis = keypoints[..., 2]
    if not bool(torch.isfinite(vis).all()):
        bad = tuple(int(i) for i in torch.nonzero(~torch.isfinite(vis))[0])
        raise InputError(
            NAME, "target['keypoints']", f"visibility (the third value) is not finite at (n, k) = {bad}"
        )
    bad_xy = (vis >= 0.5) & ~torch.isfinite(keypoints[..., :2]).all(-1)
    if bool(bad_xy.any()):
        at = tuple(int(i) for i in torch.nonzero(bad_xy)[0])
        raise InputError(
            NAME,
            "target['keypoints']",
            f"a labelled keypoint (v >= 0.5) has non-finite coordinates at (n, k) = {at}",
        )


class _Parts(NamedTuple):
    x: Tensor  # weighted KL sum of the x axis
    y: Tensor
    weight: Tensor  # (N, K) effective weight of each keypoint's KL


def _mask_factor(k: int, mask: Sequence[int], mask_weight: float, like: Tensor) -> Tensor:
    """``(K,)``: ``mask_weight`` at the indices in ``mask``, else 1 (made on the device, no copy)."""
    index = torch.arange(k, device=like.device)
    hit = torch.zeros(k, dtype=torch.bool, device=like.device)
    for j in mask:
        if j >= k:
            raise InputError(
                NAME, "out['pred']", f"mask index {j} is out of range for K = {k} keypoints (dim 1)"
            )
        hit = hit | (index == j)
    one = torch.ones((), dtype=like.dtype, device=like.device)
    return torch.where(hit, one * mask_weight, one)


def _parts(
    pred: Tensor,
    keypoints: Tensor,
    *,
    input_size: tuple[int, int],
    sigma: tuple[float, float],
    split_ratio: float,
    beta: float,
    label_softmax: bool,
    label_beta: float,
    use_target_weight: bool,
    normalize: bool,
    visibility_weight: VisibilityWeight,
    mask: Sequence[int] | None,
    mask_weight: float,
) -> _Parts:
    """The weighted KL sums of both axes (not yet normalised), computed in float32 or float64."""
    work = _work_dtype(pred)
    enc = simcc_encode(
        keypoints,
        input_size=input_size,
        sigma=sigma,
        split_ratio=split_ratio,
        visibility_weight=visibility_weight,
    )
    weight = enc.weight.to(work) if use_target_weight else torch.ones_like(enc.weight, dtype=work)
    if mask:
        weight = weight * _mask_factor(pred.shape[1], mask, mask_weight, weight)
    bins = simcc_bins(input_size, split_ratio)
    labels = []
    for axis in range(2):
        table = axis_labels(
            bins[axis],
            sigma[axis],
            label_softmax=label_softmax,
            label_beta=label_beta,
            normalize=normalize,
            dtype=work,
            device=pred.device,
        )
        labels.append(gather_labels(table, enc.centre[..., axis], enc.labelled))
    cross = cross_terms(pred, labels, beta, work)  # (N * K, 2)
    flat = weight.reshape(-1)
    sums = [torch.linalg.vecdot(flat, labels[a].neg_entropy - cross[:, a]) / bins[a] for a in range(2)]
    return _Parts(sums[0], sums[1], weight)


def rtmcc_loss(
    pred: Tensor,
    keypoints: Tensor,
    *,
    input_size: tuple[int, int] = _C.input_size,
    sigma: tuple[float, float] = _C.sigma,
    split_ratio: float = _C.split_ratio,
    beta: float = _C.beta,
    label_softmax: bool = _C.label_softmax,
    label_beta: float = _C.label_beta,
    use_target_weight: bool = _C.use_target_weight,
    normalize: bool = _C.normalize,
    visibility_weight: VisibilityWeight = _C.visibility_weight,
    normalizer: Normalizer = _C.normalizer,
    mask: tuple[int, ...] | None = _C.mask,
    mask_weight: float = _C.mask_weight,
) -> Tensor:
    """The RTMCC (SimCC KL) loss of a batch: ``(sum_nk w KL_x + sum_nk w KL_y) / K`` (or ``/ (N K)``).

    For each keypoint and axis, ``KL = mean_i q_i (log q_i - log_softmax(beta * pred)_i)`` over the
    axis' bins, with ``q = softmax(label_beta * t)`` (``label_softmax``) or ``q = t``, ``t`` the Gaussian
    label of :func:`simcc_encode`'s centre (all zero for a keypoint without a label), and ``w`` its
    weight (1 for every keypoint without ``use_target_weight``; times ``mask_weight`` for the keypoints
    in ``mask``). Computed in float32 (float64 for float64 logits) with autocast off; the result is
    float32 (float64).

    Args:
        pred: ``(N, K, W_x + W_y)`` SimCC logits, the x bins then the y bins, any floating dtype.
        keypoints: ``(N, K, 3)`` ``[x, y, v]`` in input-crop pixels, ``v`` the COCO visibility.

    Returns:
        A 0-dim tensor.

    Reference: mmpose ``SimCCLabel`` + ``KLDiscretLoss``; RTMPose, arXiv:2303.07399.
    """
    _check_inputs(pred, keypoints, input_size, split_ratio)
    with autocast_off(pred.device):
        parts = _parts(
            pred,
            keypoints,
            input_size=input_size,
            sigma=sigma,
            split_ratio=split_ratio,
            beta=beta,
            label_softmax=label_softmax,
            label_beta=label_beta,
            use_target_weight=use_target_weight,
            normalize=normalize,
            visibility_weight=visibility_weight,
            mask=mask,
            mask_weight=mask_weight,
        )
        n, k = pred.shape[:2]
        count = max(k, 1) * (max(n, 1) if normalizer == "instances_and_keypoints" else 1)
        return (parts.x + parts.y) / count


class RTMCCLoss(Criterion[RTMCCLossConfig]):
    """RTMPose's SimCC loss: KL divergence to Gaussian SimCC labels, per keypoint and axis, weighted.

    ``x = sum_nk w_nk KL_x(n, k) / D`` and ``y`` likewise, with ``D = K`` (``normalizer: keypoints``,
    mmpose and NetsPresso: the loss grows with the batch size) or ``N * K``; see :func:`rtmcc_loss` for
    ``KL`` and ``w``. The loss is ``x + y``; these are the terms. Diagnostic ``num_weighted``: the
    keypoints whose weight is > 0.

    Inputs:
        out["pred"]: ``(N, K, W_x + W_y)`` SimCC logits, ``W_x = round(w * split_ratio)``,
            ``W_y = round(h * split_ratio)`` for ``input_size = (w, h)``.
        target["keypoints"]: ``(N, K, 3)`` ``[x, y, v]`` in input-crop pixels, ``v`` the raw COCO
            visibility (0, 1, 2).

    Reference: Jiang et al., "RTMPose", arXiv:2303.07399; mmpose ``SimCCLabel`` and ``KLDiscretLoss``.
    """

    name: ClassVar[str] = NAME
    Config = RTMCCLossConfig
    inputs: ClassVar[Mapping[str, str]] = {
        "pred": "(N, K, W_x + W_y) SimCC logits (x bins, then y bins), any floating dtype",
    }
    targets: ClassVar[Mapping[str, str]] = {
        "keypoints": "(N, K, 3) [x, y, v] in input-crop pixels, v the COCO visibility (0, 1, 2)",
    }
    terms: ClassVar[tuple[str, ...]] = ("x", "y")
    diagnostics: ClassVar[tuple[str, ...]] = ("num_weighted",)

    def forward(self, out: Mapping[str, Any], target: Mapping[str, Any]) -> LossTerms:
        cfg = self.config
        pred = get_tensor(
            out, "pred", criterion=NAME, side="out", expected="(N, K, W_x + W_y) logits", float_only=True
        )
        keypoints = get_tensor(
            target, "keypoints", criterion=NAME, side="target", expected="(N, K, 3) [x, y, v]"
        )
        _check_inputs(pred, keypoints, cfg.input_size, cfg.split_ratio)
        if value_checks_enabled(keypoints):
            _check_values(keypoints)
        with autocast_off(pred.device):
            parts = _parts(
                pred,
                keypoints,
                input_size=cfg.input_size,
                sigma=cfg.sigma,
                split_ratio=cfg.split_ratio,
                beta=cfg.beta,
                label_softmax=cfg.label_softmax,
                label_beta=cfg.label_beta,
                use_target_weight=cfg.use_target_weight,
                normalize=cfg.normalize,
                visibility_weight=cfg.visibility_weight,
                mask=cfg.mask,
                mask_weight=cfg.mask_weight,
            )
            norm = self._normaliser(pred)
            x, y = parts.x / norm, parts.y / norm
        if value_checks_enabled(x) and not math.isfinite(float((x + y).detach())):
            raise explain_non_finite(NAME, [("out['pred']", pred)]) or InputError(
                NAME, "out['pred']", f"the loss is not finite (logits too large for beta = {cfg.beta}?)"
            )
        num_weighted = (parts.weight > 0).sum().to(torch.float32)
        return LossTerms({"x": x, "y": y}, {"num_weighted": num_weighted})

    def _normaliser(self, pred: Tensor) -> Tensor | float:
        """``K`` or ``N K``; across ranks ``K / world_size`` or ``mean_ranks(N) K``."""
        cfg = self.config
        n, k = pred.shape[:2]
        k = max(k, 1)
        if cfg.normalizer == "keypoints":
            if cfg.normalize_across_ranks and is_distributed():
                return k / torch.distributed.get_world_size()
            return float(k)
        if not (cfg.normalize_across_ranks and is_distributed()):
            return float(max(n, 1) * k)
        dtype = _work_dtype(pred)
        count = torch.full((), float(n), dtype=torch.float64, device=pred.device)
        return (global_mean(count, enabled=True, min=1e-12) * k).to(dtype)

    def example(
        self,
        batch_size: int = 2,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """``batch_size`` instances of 17 keypoints (COCO): random logits, keypoints in and around the
        crop with visibilities 0, 1 and 2."""
        cfg = self.config
        k = 17
        wx, wy = simcc_bins(cfg.input_size, cfg.split_ratio)
        pred = torch.randn(batch_size, k, wx + wy, generator=generator).to(device).requires_grad_()
        size = torch.tensor(cfg.input_size, dtype=torch.float32)
        xy = (torch.rand(batch_size, k, 2, generator=generator) * 1.2 - 0.1) * size
        vis = torch.randint(0, 3, (batch_size, k, 1), generator=generator).float()
        keypoints = torch.cat((xy, vis), -1).to(device)
        return {"pred": pred}, {"keypoints": keypoints}
