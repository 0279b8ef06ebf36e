"""Segmentation metrics from a confusion matrix accumulated on the device.

The confusion matrix ``C`` is ``(K, K)`` int64 with **rows = ground truth, columns =
prediction**: ``C[g, p]`` counts pixels of true class ``g`` predicted as ``p``. Pixels whose
label is ``ignore_index`` — or any label outside ``[0, K)`` — are not counted.

From it, with ``TP = diag(C)``, ``gt = C.sum(1)`` and ``pred = C.sum(0)``:

- ``IoU_c = TP_c / (gt_c + pred_c - TP_c)`` and ``Acc_c = TP_c / gt_c`` per class;
- ``aAcc = ΣTP / ΣC`` (pixel accuracy), ``mAcc`` and ``mIoU`` the means over classes,
  ``fwIoU = Σ_c (gt_c / ΣC) · IoU_c`` (frequency-weighted IoU);
- every number is a **percentage** (0–100), as papers report them.

Convention for absent classes (the one mmseg and the Cityscapes scripts use): a ratio whose
denominator is zero is undefined and reported as NaN, and NaNs are left out of the means.

- A class absent from both the ground truth and the predictions has IoU = NaN and Acc = NaN,
  and does not count towards mIoU or mAcc.
- A class that is only predicted (false positives, no ground truth) has IoU = 0 — it lowers
  mIoU — and Acc = NaN.
- A class that is in the ground truth but never predicted has IoU = Acc = 0.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import Tensor

SUMMARY_KEYS = ("aAcc", "mAcc", "mIoU", "fwIoU")


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """The ``(K, K)`` int64 confusion matrix of one batch, on ``target``'s device.

    ``pred`` and ``target`` hold class indices of the same shape. One ``torch.bincount`` over
    ``target * K + pred`` does the counting without leaving the device.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    pred = pred.reshape(-1).to(device=target.device, dtype=torch.int64)
    target = target.reshape(-1).to(torch.int64)
    valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    valid &= (pred >= 0) & (pred < num_classes)
    index = target[valid] * num_classes + pred[valid]
    counts = torch.bincount(index, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


class ConfusionMeter:
    """Accumulates a confusion matrix over batches on one device, and across ranks.

    ``update`` never synchronises with the host. ``reduce`` returns the sum over all ranks
    (an ``all_reduce`` when ``torch.distributed`` is initialised) without changing the local
    counts, so it may be called more than once.
    """

    def __init__(self, num_classes: int, ignore_index: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.confusion.zero_()

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch. ``pred`` is class indices shaped like ``target``, or logits ``(B, K, ...)``."""
        if pred.dim() == target.dim() + 1:
            pred = pred.argmax(dim=1)
        target = target.to(self.confusion.device, non_blocking=True)
        self.confusion += confusion_matrix(pred, target, self.num_classes, self.ignore_index)

    def reduce(self) -> Tensor:
        """The confusion matrix summed over all ranks."""
        total = self.confusion.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    def compute(self, class_names: Sequence[str] | None = None) -> tuple[dict[str, float], pd.DataFrame]:
        """Metrics of the reduced confusion matrix; see :func:`compute_metrics`."""
        return compute_metrics(self.reduce(), class_names)


def compute_metrics(
    confusion: Tensor | np.ndarray, class_names: Sequence[str] | None = None
) -> tuple[dict[str, float], pd.DataFrame]:
    """Summary metrics and the per-class table of a confusion matrix (rows = ground truth).

    Returns ``({"aAcc", "mAcc", "mIoU", "fwIoU"} in percent, DataFrame[class, IoU, Acc,
    pixels])`` where ``pixels`` is the number of ground-truth pixels of the class. NaN marks
    undefined values (see the module docstring); means skip them. With no counted pixels at
    all, every summary value is NaN.
    """
    if isinstance(confusion, Tensor):
        confusion = confusion.detach().cpu().numpy()
    conf = np.asarray(confusion, dtype=np.float64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {conf.shape}")
    k = conf.shape[0]
    names = [str(i) for i in range(k)] if class_names is None else [str(n) for n in class_names]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for a {k}-class confusion matrix")

    tp = np.diag(conf)
    gt = conf.sum(axis=1)
    pred = conf.sum(axis=0)
    union = gt + pred - tp
    total = conf.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)

    def nanmean(values: np.ndarray) -> float:
        finite = values[~np.isnan(values)]
        return float(finite.mean()) * 100.0 if finite.size else float("nan")

    if total > 0:
        a_acc = float(tp.sum() / total) * 100.0
        fw_iou = float(np.nansum(gt / total * iou)) * 100.0
    else:
        a_acc = fw_iou = float("nan")
    summary = {"aAcc": a_acc, "mAcc": nanmean(acc), "mIoU": nanmean(iou), "fwIoU": fw_iou}
    per_class = pd.DataFrame(
        {"class": names, "IoU": iou * 100.0, "Acc": acc * 100.0, "pixels": gt.astype(np.int64)}
    )
    return summary, per_class
