# SPDX-License-Identifier: Apache-2.0
"""losskit-ops: the kernels losskit's plugins share (as ``torchvision.ops`` for torchvision's models).

It registers no criterion. Everything here is functional, typed and documented with shapes; where
torchvision has the op, losskit keeps its signature and errors (:func:`sigmoid_focal_loss`) or simply
uses torchvision's.
"""

from __future__ import annotations

from losskit_ops._resize import resize2d
from losskit_ops._upsampled_ce_sum import upsampled_ce_sum
from losskit_ops._upsampled_nll import upsampled_nll
from losskit_ops._yolo_iou import (
    YoloBoxParts,
    yolo_box_iou,
    yolo_box_parts,
    yolo_iou_of_parts,
    yolo_pairwise_ciou_,
)
from losskit_ops.boxes import batched_box_iou, box_iou_aligned, decode_deltas, encode_deltas
from losskit_ops.focal import sigmoid_focal_loss, sigmoid_focal_loss_indexed, sigmoid_focal_loss_reference

__version__ = "0.1.0"

__all__ = [
    "YoloBoxParts",
    "__version__",
    "batched_box_iou",
    "box_iou_aligned",
    "decode_deltas",
    "encode_deltas",
    "resize2d",
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_indexed",
    "sigmoid_focal_loss_reference",
    "upsampled_ce_sum",
    "upsampled_nll",
    "yolo_box_iou",
    "yolo_box_parts",
    "yolo_iou_of_parts",
    "yolo_pairwise_ciou_",
]
