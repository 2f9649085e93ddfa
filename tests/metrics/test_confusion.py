"""Known-answer tests of the per-image confusion matrix (dhr_label.metrics.confusion)."""
import numpy as np
import pytest

from dhr_label.metrics import confusion_matrix


def brute_force(pred, gt, c, ignore=255):
    m = np.zeros((c, c + 1), dtype=np.int64)
    for g, p in zip(gt.ravel().tolist(), (pred.ravel().tolist() if pred is not None else [None] * gt.size)):
        if g == ignore:
            continue
        m[g, p if p is not None and 0 <= p < c else c] += 1
    return m


def test_confusion_counts_by_hand():
    gt = np.array([[0, 0, 1], [1, 255, 2]], dtype=np.uint8)
    pred = np.array([[0, 1, 1], [255, 0, 7]], dtype=np.uint8)
    m = confusion_matrix(pred, gt, num_classes=3)
    # gt 0: pred 0, 1; gt 1: pred 1, 255 (wrong); gt 255: dropped; gt 2: pred 7 (no class: wrong)
    assert m.tolist() == [[1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 0, 1]]
    assert m.dtype == np.int64


def test_missing_prediction_counts_every_labelled_pixel_as_wrong():
    gt = np.array([[0, 1, 255, 1]], dtype=np.uint8)
    assert confusion_matrix(None, gt, num_classes=2).tolist() == [[0, 0, 1], [0, 0, 2]]


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.int64])
def test_confusion_matches_brute_force_for_every_dtype(dtype):
    rng = np.random.default_rng(7)
    gt = rng.integers(0, 5, (9, 11))
    gt[rng.random(gt.shape) < 0.2] = 255
    pred = rng.integers(0, 7, (9, 11))
    pred[rng.random(pred.shape) < 0.2] = 255
    expected = brute_force(pred, gt, 5)
    assert (confusion_matrix(pred.astype(dtype), gt.astype(dtype), num_classes=5) == expected).all()
    assert (confusion_matrix(None, gt.astype(dtype), num_classes=5) == brute_force(None, gt, 5)).all()


def test_negative_prediction_is_wrong_not_dropped():
    gt = np.array([[0, 1]])
    pred = np.array([[-1, 1]])
    assert confusion_matrix(pred, gt, num_classes=2).tolist() == [[0, 0, 1], [0, 1, 0]]


def test_counts_stay_exact_past_float32():
    # 2**24 + 1 pixels: float32 cannot hold the count, int64 must.
    n = 2**24 + 1
    gt = np.zeros((1, n), dtype=np.uint8)
    m = confusion_matrix(gt, gt, num_classes=1)
    assert m[0, 0] == n
    assert int(np.float32(n)) != n  # the trap this avoids


def test_ground_truth_outside_the_classes_is_an_error():
    gt = np.array([[0, 30, 21, 255]], dtype=np.uint8)
    with pytest.raises(ValueError, match=r"ids 21, 30 outside the 21 classes"):
        confusion_matrix(gt, gt, num_classes=21)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"prediction is 2 x 3 but ground truth is 3 x 2"):
        confusion_matrix(np.zeros((2, 3), np.uint8), np.zeros((3, 2), np.uint8), num_classes=2)
