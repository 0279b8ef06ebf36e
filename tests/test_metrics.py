"""Confusion matrix and segmentation metrics, checked against hand-computed numbers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from emactl.engine.metrics import ConfusionMeter, compute_metrics, confusion_matrix

# Rows = ground truth, columns = prediction. Worked by hand:
#   TP = (5, 3, 4), gt = (6, 6, 4), pred = (7, 4, 5), total = 16
#   IoU = 5/(6+7-5) = 5/8, 3/(6+4-3) = 3/7, 4/(4+5-4) = 4/5
#   Acc = 5/6, 3/6, 4/4
HAND = [
    [5, 1, 0],
    [2, 3, 1],
    [0, 0, 4],
]
HAND_AACC = 100 * 12 / 16
HAND_MACC = 100 * (5 / 6 + 3 / 6 + 4 / 4) / 3
HAND_MIOU = 100 * (5 / 8 + 3 / 7 + 4 / 5) / 3
HAND_FWIOU = 100 * (6 / 16 * 5 / 8 + 6 / 16 * 3 / 7 + 4 / 16 * 4 / 5)


def test_hand_computed_matrix():
    summary, per_class = compute_metrics(torch.tensor(HAND), ["a", "b", "c"])
    assert summary["aAcc"] == pytest.approx(75.0)
    assert summary["aAcc"] == pytest.approx(HAND_AACC)
    assert summary["mAcc"] == pytest.approx(HAND_MACC)
    assert summary["mIoU"] == pytest.approx(HAND_MIOU)
    assert summary["fwIoU"] == pytest.approx(HAND_FWIOU)
    assert list(per_class.columns) == ["class", "IoU", "Acc", "pixels"]
    assert per_class["class"].tolist() == ["a", "b", "c"]
    assert per_class["IoU"].tolist() == pytest.approx([62.5, 300 / 7, 80.0])
    assert per_class["Acc"].tolist() == pytest.approx([500 / 6, 50.0, 100.0])
    assert per_class["pixels"].tolist() == [6, 6, 4]


def test_absent_class_is_nan_and_excluded():
    """A fourth class with no ground truth and no prediction changes none of the means."""
    conf = np.zeros((4, 4), dtype=np.int64)
    conf[:3, :3] = HAND
    summary, per_class = compute_metrics(conf)
    assert math.isnan(per_class["IoU"][3]) and math.isnan(per_class["Acc"][3])
    assert per_class["pixels"][3] == 0
    assert summary["mIoU"] == pytest.approx(HAND_MIOU)
    assert summary["mAcc"] == pytest.approx(HAND_MACC)
    assert summary["fwIoU"] == pytest.approx(HAND_FWIOU)
    assert summary["aAcc"] == pytest.approx(HAND_AACC)


def test_predicted_only_class_counts_zero_iou():
    """False positives of a class absent from the ground truth: IoU 0 (in the mean), Acc NaN."""
    conf = np.array([[3, 1], [0, 0]])
    summary, per_class = compute_metrics(conf)
    assert per_class["IoU"].tolist() == pytest.approx([75.0, 0.0])
    assert math.isnan(per_class["Acc"][1])
    assert summary["mIoU"] == pytest.approx(37.5)
    assert summary["mAcc"] == pytest.approx(75.0)
    assert summary["aAcc"] == pytest.approx(75.0)


def test_empty_matrix_gives_nan():
    summary, _ = compute_metrics(torch.zeros(3, 3, dtype=torch.int64))
    assert all(math.isnan(v) for v in summary.values())


def reference_confusion(pred, target, k, ignore):
    out = [[0] * k for _ in range(k)]
    for p, t in zip(pred.reshape(-1).tolist(), target.reshape(-1).tolist()):
        if t == ignore or not 0 <= t < k:
            continue
        out[t][p] += 1
    return torch.tensor(out, dtype=torch.int64)


def test_confusion_matrix_matches_loop():
    g = torch.Generator().manual_seed(1)
    k = 5
    pred = torch.randint(0, k, (2, 7, 9), generator=g)
    target = torch.randint(0, k, (2, 7, 9), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.2] = 255
    conf = confusion_matrix(pred, target, k, 255)
    assert conf.dtype == torch.int64 and conf.shape == (k, k)
    assert torch.equal(conf, reference_confusion(pred, target, k, 255))
    assert conf.sum() == (target != 255).sum()


def test_ignore_index_is_not_counted():
    pred = torch.tensor([[0, 1, 1, 0]])
    target = torch.tensor([[0, 255, 1, 255]])
    assert confusion_matrix(pred, target, 2, 255).tolist() == [[1, 0], [0, 1]]
    # A different ignore index: 0 is ignored and 255, being out of range, is never counted.
    assert confusion_matrix(pred, target, 2, 0).tolist() == [[0, 0], [0, 1]]


def test_meter_accumulates_logits_and_labels():
    k = 3
    meter = ConfusionMeter(k, 255)
    target = torch.tensor([[[0, 1], [2, 255]]])
    logits = torch.zeros(1, k, 2, 2)
    logits[0, 0] = 1.0  # predicts class 0 everywhere
    meter.update(logits, target)
    meter.update(torch.tensor([[[0, 1], [2, 0]]]), target)
    assert meter.confusion.tolist() == [[2, 0, 0], [1, 1, 0], [1, 0, 1]]
    assert torch.equal(meter.reduce(), meter.reduce())
    summary, _ = meter.compute()
    assert summary["aAcc"] == pytest.approx(100 * 4 / 6)
