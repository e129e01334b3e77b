"""Evaluation numbers on hand-made masks whose IoUs are worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.evaluate import summarize
from finetune.metrics import confusion_matrix, metrics_from_confusion

NAMES = ["background", "cat", "dog"]

# 4x4 ground truth / prediction, 255 = ignore.
GT = np.array([[0, 0, 1, 1],
               [0, 0, 1, 1],
               [2, 2, 2, 255],
               [2, 2, 2, 255]], np.uint8)
PRED = np.array([[0, 1, 1, 1],
                 [0, 0, 1, 0],
                 [2, 2, 0, 2],
                 [1, 2, 2, 0]], np.uint8)


def test_confusion_matrix_counts_by_hand() -> None:
    cm = confusion_matrix(PRED, GT, 3)
    # rows = truth, columns = prediction; the two ignore pixels are left out
    expected = np.array([[3, 1, 0],
                         [1, 3, 0],
                         [1, 1, 4]])
    np.testing.assert_array_equal(cm, expected)
    assert cm.sum() == 14


def test_iou_accuracy_and_miou_by_hand() -> None:
    m = metrics_from_confusion(confusion_matrix(PRED, GT, 3), NAMES)
    # background: tp 3, gt 4, pred 5 -> 3 / 6 ; cat: tp 3, gt 4, pred 5 -> 3 / 6 ; dog: tp 4, gt 6, pred 4 -> 4 / 6
    assert m["per_class"]["background"]["iou"] == pytest.approx(0.5)
    assert m["per_class"]["cat"]["iou"] == pytest.approx(0.5)
    assert m["per_class"]["dog"]["iou"] == pytest.approx(4 / 6, abs=1e-6)
    assert m["miou"] == pytest.approx((0.5 + 0.5 + 4 / 6) / 3, abs=1e-6)
    assert m["pixel_accuracy"] == pytest.approx(10 / 14, abs=1e-6)
    assert m["per_class"]["dog"]["accuracy"] == pytest.approx(4 / 6, abs=1e-6)
    assert m["per_class"]["cat"]["gt_pixels"] == 4 and m["per_class"]["cat"]["pred_pixels"] == 5


def test_absent_class_is_undefined_not_zero_and_false_positives_count() -> None:
    gt = np.array([[0, 0], [0, 0]], np.uint8)
    perfect = metrics_from_confusion(confusion_matrix(gt, gt, 3), NAMES)
    assert perfect["miou"] == 1.0 and perfect["per_class"]["cat"]["iou"] is None
    pred = np.array([[0, 0], [0, 1]], np.uint8)  # a false 'cat' pixel: cat IoU is 0 and counts in the mean
    m = metrics_from_confusion(confusion_matrix(pred, gt, 3), NAMES)
    assert m["per_class"]["cat"]["iou"] == 0.0 and m["per_class"]["dog"]["iou"] is None
    assert m["miou"] == pytest.approx((0.75 + 0.0) / 2)
    empty = metrics_from_confusion(np.zeros((3, 3), np.int64), NAMES)
    assert empty["miou"] is None and empty["pixel_accuracy"] is None


def test_per_source_and_per_kind_pooling() -> None:
    a = confusion_matrix(PRED, GT, 3)
    b = confusion_matrix(GT.copy(), GT, 3)  # a perfect source
    rep = summarize({"render": a, "photos": b}, {"render": "synthetic", "photos": "real"}, NAMES)
    assert rep["sources"]["photos"]["miou"] == 1.0
    assert rep["by_kind"]["synthetic"]["miou"] == rep["sources"]["render"]["miou"]
    pooled = np.asarray(rep["overall"]["confusion"])
    np.testing.assert_array_equal(pooled, a + b)
    assert rep["overall"]["pixel_accuracy"] == pytest.approx((10 + 14) / 28)


def test_ids_beyond_the_class_count_are_refused() -> None:
    with pytest.raises(ValueError, match="num_classes=2"):
        confusion_matrix(PRED, GT, 2)
