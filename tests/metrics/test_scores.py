"""Known-answer tests of the scores of a confusion matrix (dhr_label.metrics.scores)."""
import math

import numpy as np
import pytest

from dhr_label.metrics import class_scores, confusion_matrix, image_miou, summary_scores, vanished_classes

TOL = 1e-12  # the scores are ratios of exact integers: only rounding of one division


def test_class_scores_by_hand():
    # gt 0: 3 right, 1 predicted as 1; gt 1: 2 right, 2 predicted with no class id.
    s = class_scores(np.array([[3, 1, 0], [0, 2, 2]]))
    assert s.tp.tolist() == [3, 2] and s.fp.tolist() == [0, 1] and s.fn.tolist() == [1, 2]
    assert s.tn.tolist() == [4, 3]  # 8 labelled pixels - tp - fp - fn
    assert s.invalid_pixels == 2
    expected = {
        "iou": [3 / 4, 2 / 5],
        "precision": [3 / 3, 2 / 3],
        "recall": [3 / 4, 2 / 4],
        "fpr": [0 / 4, 1 / 4],
        "fnr": [1 / 4, 2 / 4],
        "fp_union": [0 / 4, 1 / 5],
        "fn_union": [1 / 4, 2 / 5],
    }
    for name, values in expected.items():
        assert getattr(s, name) == pytest.approx(values, abs=TOL), name
    assert s.iou + s.fp_union + s.fn_union == pytest.approx([1, 1], abs=TOL)


def test_summary_by_hand_and_absent_class_excluded():
    # class 2 absent from GT and prediction; class 3 predicted only.
    m = np.array([
        [3, 1, 0, 0, 0],
        [0, 2, 0, 1, 1],
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
    ])
    s = class_scores(m)
    assert s.present.tolist() == [True, True, False, True]
    assert math.isnan(s.iou[2]) and s.iou[3] == 0.0 and math.isnan(s.recall[3])
    out = summary_scores(s)
    assert out["classes_present"] == 3
    assert out["labelled_pixels"] == 8
    assert out["miou"] == pytest.approx((3 / 4 + 2 / 5 + 0) / 3, abs=TOL)
    assert out["pixel_accuracy"] == pytest.approx(5 / 8, abs=TOL)
    assert out["mean_accuracy"] == pytest.approx((3 / 4 + 2 / 4) / 2, abs=TOL)  # recall NaN for 3
    assert out["mean_precision"] == pytest.approx((1 + 2 / 3 + 0) / 3, abs=TOL)
    assert out["fwiou"] == pytest.approx(4 / 8 * 3 / 4 + 4 / 8 * 2 / 5, abs=TOL)
    # FPR = FP / (FP + TN): class 0: 0 / 4; class 1: 1 / (1 + 3); class 3: 1 / (1 + 7)
    assert s.fpr[[0, 1, 3]] == pytest.approx([0, 1 / 4, 1 / 8], abs=TOL)
    assert out["mean_fpr"] == pytest.approx((0 + 1 / 4 + 1 / 8) / 3, abs=TOL)


def test_perfect_prediction_scores_one():
    gt = np.array([[0, 1, 1, 255], [2, 2, 1, 0]], dtype=np.uint8)
    out = summary_scores(class_scores(confusion_matrix(gt, gt, num_classes=3)))
    assert out["miou"] == 1.0 and out["pixel_accuracy"] == 1.0 and out["fwiou"] == pytest.approx(1.0, abs=TOL)
    assert out["mean_fpr"] == 0.0 and out["mean_fn_union"] == 0.0


def test_image_miou_over_classes_of_the_image():
    gt = np.array([[0, 0, 1, 1]], dtype=np.uint8)
    pred = np.array([[0, 0, 0, 1]], dtype=np.uint8)
    # class 0: 2 / 3; class 1: 1 / 2; class 2 (of 3) absent: not in the mean
    assert image_miou(confusion_matrix(pred, gt, num_classes=3)) == pytest.approx((2 / 3 + 1 / 2) / 2, abs=TOL)
    empty = np.full((2, 2), 255, dtype=np.uint8)
    assert math.isnan(image_miou(confusion_matrix(empty, empty, num_classes=3)))


def test_vanished_needs_a_share_and_a_low_iou():
    # 2000 pixels: class 0 = 1997, class 1 = 2 (0.1 % -> eligible), class 2 = 1 (< 0.1 %)
    gt = np.zeros(2000, dtype=np.uint8)
    gt[:2] = 1
    gt[2] = 2
    pred = np.zeros_like(gt)  # classes 1 and 2 lost
    eligible, vanished = vanished_classes(confusion_matrix(pred[None], gt[None], num_classes=3))
    assert eligible.tolist() == [True, True, False]
    assert vanished.tolist() == [False, True, False]


def test_vanished_threshold_is_strictly_below_point_one():
    gt = np.array([[1] * 10 + [0] * 90], dtype=np.uint8)
    pred = gt.copy()
    pred[0, 1:10] = 0  # class 1: 1 of 10 kept, no FP: IoU exactly 0.1 -> not vanished
    _, vanished = vanished_classes(confusion_matrix(pred, gt, num_classes=2))
    assert not vanished[1]
    pred[0, 0] = 0  # IoU 0 -> vanished
    _, vanished = vanished_classes(confusion_matrix(pred, gt, num_classes=2))
    assert vanished[1]
