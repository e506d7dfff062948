# SPDX-License-Identifier: Apache-2.0
"""Shared helpers of the retinanet_loss tests: seeded batches, real anchors, torchvision as reference.

Imported by the test modules and by the processes that ``losskit.testing.run_on_ranks`` spawns
(``tests/conftest.py`` puts this folder on ``sys.path``, which the spawned processes inherit).
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch
from torch import Tensor
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
from torchvision.ops import box_iou

# torchvision's default RetinaNet anchors: 3 sizes x 3 ratios per level, P3-P7 (strides 8..128)
SIZES = tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in (32, 64, 128, 256, 512))
RATIOS = ((0.5, 1.0, 2.0),) * 5
STRIDES = (8, 16, 32, 64, 128)


@functools.lru_cache(maxsize=4)
def _anchors(image: int) -> tuple[Tensor, tuple[int, ...]]:
    gen = AnchorGenerator(SIZES, RATIOS)
    feats = [torch.zeros(1, 1, -(-image // s), -(-image // s)) for s in STRIDES]
    anchors = gen(ImageList(torch.zeros(1, 3, image, image), [(image, image)]), feats)[0]
    return anchors, tuple(f.shape[2] * f.shape[3] * 9 for f in feats)


def real_anchors(image: int = 640) -> tuple[Tensor, tuple[int, ...]]:
    """torchvision's ``AnchorGenerator`` anchors for a square image: ``(A, 4)`` and the per-level counts."""
    anchors, sizes = _anchors(image)
    return anchors.clone(), sizes


def random_boxes(
    n: int, image: int, g: torch.Generator, *, min_size: float = 8.0, max_size: float | None = None
) -> Tensor:
    max_size = max_size if max_size is not None else image / 2
    wh = min_size + torch.rand(n, 2, generator=g) * (max_size - min_size)
    xy = torch.rand(n, 2, generator=g) * (image - wh)
    return torch.cat([xy, xy + wh], dim=1)


def make_batch(
    counts: list[int],
    *,
    image: int = 128,
    num_classes: int = 7,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    crowded: bool = False,
) -> tuple[list[Tensor], list[Tensor], Tensor, list[dict[str, Tensor]]]:
    """Seeded per-level logits/deltas (leaf tensors), real anchors and B gt dicts with ``counts`` boxes.

    ``crowded`` adds exact duplicates and near-duplicates of boxes (ties in IoU for the matcher).
    """
    g = torch.Generator().manual_seed(seed)
    anchors, sizes = real_anchors(image)
    b = len(counts)
    cls = [(torch.randn(b, n, num_classes, generator=g, dtype=torch.float64) - 2.0).to(dtype) for n in sizes]
    reg = [(0.3 * torch.randn(b, n, 4, generator=g, dtype=torch.float64)).to(dtype) for n in sizes]
    gt = []
    for n in counts:
        boxes = random_boxes(n, image, g)
        if crowded and n >= 4:
            boxes[1] = boxes[0]  # exact duplicate: a tie between gts for every anchor
            boxes[3] = boxes[2] + 0.5  # near duplicate
        gt.append({"boxes": boxes.to(dtype), "labels": torch.randint(0, num_classes, (n,), generator=g)})
    for t in cls + reg:
        t.requires_grad_()
    return cls, reg, anchors.to(dtype), gt


def torchvision_loss(
    cls: list[Tensor],
    reg: list[Tensor],
    anchors: list[Tensor] | Tensor,
    gt: list[dict[str, Tensor]],
    *,
    fg_iou_thresh: float = 0.5,
    bg_iou_thresh: float = 0.4,
    allow_low_quality_matches: bool = True,
    box_loss: str = "l1",
) -> tuple[dict[str, Tensor], list[Tensor]]:
    """torchvision's ``RetinaNet.compute_loss`` on these inputs, and the matched indices it used."""
    b = len(gt)
    num_classes = cls[0].shape[-1]
    anchor_list = anchors if isinstance(anchors, list) else [anchors] * b
    head = RetinaNetHead(4, 9, num_classes)
    head.regression_head._loss_type = box_loss
    recorded: list[Tensor] = []

    class _Recorder:
        def compute_loss(
            self, targets: Any, head_outputs: Any, anchors: Any, matched_idxs: list[Tensor]
        ) -> Any:
            recorded.extend(matched_idxs)
            return head.compute_loss(targets, head_outputs, anchors, matched_idxs)

    model = types.SimpleNamespace(
        proposal_matcher=Matcher(
            fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=allow_low_quality_matches
        ),
        head=_Recorder(),
    )
    outputs = {"cls_logits": torch.cat(cls, dim=1), "bbox_regression": torch.cat(reg, dim=1)}
    losses = RetinaNet.compute_loss(model, gt, outputs, anchor_list)  # type: ignore[arg-type]
    return losses, recorded


def torchvision_matches(boxes: Tensor, anchors: Tensor, **matcher: Any) -> Tensor:
    """One image's matches by torchvision's ``Matcher`` (all background when there is no gt)."""
    if boxes.numel() == 0:
        return torch.full((anchors.shape[0],), -1, dtype=torch.int64)
    return Matcher(
        matcher.get("fg_iou_thresh", 0.5),
        matcher.get("bg_iou_thresh", 0.4),
        allow_low_quality_matches=matcher.get("allow_low_quality_matches", True),
    )(box_iou(boxes, anchors))


def grads(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.grad.reshape(t.shape[0], -1) for t in tensors], dim=1)


def rel_diff(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max(max |b|, tiny)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)) if b.numel() else 0.0


def fresh(tensors: list[Tensor]) -> list[Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


# -- data-parallel worker (module level so spawned ranks can unpickle it) ------------------------------


def loss_with_shared_params(
    batch: Any, cfg: dict[str, Any], *, average_over_ranks: bool = False
) -> tuple[Tensor, Tensor, Tensor, tuple[tuple[str, ...], tuple[str, ...]]]:
    """Loss of ``batch`` whose logits and deltas get a shared per-anchor bias (the "model parameters").

    Returns the detached loss, the gradients of the two bias parameters (all-reduced and divided by the
    world size when ``average_over_ranks``, as DDP does) and the names of the terms and diagnostics.
    """
    from losskit_detection_retinanet import RetinaNetLoss

    cls, reg, anchors, gt = batch
    a = sum(t.shape[1] for t in cls)
    theta_c = torch.zeros(a, cls[0].shape[2], dtype=cls[0].dtype, requires_grad=True)
    theta_r = torch.zeros(a, 4, dtype=reg[0].dtype, requires_grad=True)
    c_in, r_in, start = [], [], 0
    for c, r in zip(cls, reg):
        n = c.shape[1]
        c_in.append(c.detach() + theta_c[start : start + n])
        r_in.append(r.detach() + theta_r[start : start + n])
        start += n
    res = RetinaNetLoss(**cfg)({"cls_logits": c_in, "bbox_regression": r_in, "anchors": anchors}, {"gt": gt})
    total = res.total
    total.backward()
    gc, gr = theta_c.grad, theta_r.grad
    if average_over_ranks:
        import torch.distributed as dist

        for t in (gc, gr):
            dist.all_reduce(t)
            t /= dist.get_world_size()
    return total.detach(), gc, gr, (tuple(res), tuple(res.diagnostics))


def ddp_worker(rank: int, world_size: int, batches: list[Any], configs: list[dict[str, Any]]) -> list[Any]:
    """Rank ``rank`` computes the loss of ``batches[rank]`` for every config; DDP-averaged gradients."""
    return [loss_with_shared_params(batches[rank], cfg, average_over_ranks=True) for cfg in configs]
