"""Scores from a summed confusion matrix (see :func:`~.confusion.confusion_matrix`).

Conventions, stated once:
- A class is *present* when it has ground-truth or predicted pixels (its union is non-zero).
  Absent classes get NaN everywhere and are left out of every mean.
- A ratio with a zero denominator is NaN and left out of its mean (``nanmean``), as in
  mmsegmentation: a class predicted but absent from the ground truth has IoU 0 (counted)
  and recall NaN (not counted).
- Pixels predicted with a non-class id (column C) are false negatives of their ground-truth
  class and false positives of none.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Minor-class view: a ground-truth class of an image is *eligible* when it covers at least
#: this share of the image's labelled pixels ...
VANISHED_MIN_SHARE = 0.001
#: ... and it has *vanished* when its per-image IoU is below this.
VANISHED_MAX_IOU = 0.1


@dataclass(frozen=True)
class ClassScores:
    """Per-class counts (int64) and scores (float64 in [0, 1], NaN when undefined), shape (C,).

    ``fpr`` / ``fnr`` are the usual rates FP / (FP + TN) and FN / (FN + TP). ``fp_union`` /
    ``fn_union`` are FP / union and FN / union, the normalisation of the PSA / SEAM / IRN
    evaluation code that DHR reports (so that ``iou + fp_union + fn_union = 1``).
    """

    tp: np.ndarray
    gt_pixels: np.ndarray
    pred_pixels: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    tn: np.ndarray
    present: np.ndarray
    iou: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    fpr: np.ndarray
    fnr: np.ndarray
    fp_union: np.ndarray
    fn_union: np.ndarray
    invalid_pixels: int  # labelled pixels predicted with a non-class id

    #: The per-class ratios, in report order.
    RATIOS = ("iou", "precision", "recall", "fpr", "fnr", "fp_union", "fn_union")


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def class_scores(confusion: np.ndarray) -> ClassScores:
    """Per-class counts and ratios of a (C, C + 1) int64 confusion matrix.

    Parameters
    ----------
    confusion : (C, C + 1) int64 array
        Rows: ground-truth class; columns: predicted class, the last one "not a class id".

    Examples
    --------
    >>> s = class_scores(np.array([[3, 1, 0], [0, 2, 2]]))
    >>> s.iou.round(4).tolist(), s.fp_union.round(4).tolist(), s.invalid_pixels
    ([0.75, 0.4], [0.0, 0.2], 2)
    """
    confusion = np.asarray(confusion)
    c = confusion.shape[0]
    if confusion.shape != (c, c + 1):
        raise ValueError(f"expected a (C, C + 1) confusion matrix, found shape {confusion.shape}")
    confusion = confusion.astype(np.int64, copy=False)
    tp = np.diagonal(confusion[:, :c]).copy()
    gt = confusion.sum(axis=1)
    pred = confusion[:, :c].sum(axis=0)
    fp, fn = pred - tp, gt - tp
    union = gt + pred - tp
    total = int(gt.sum())
    tn = total - tp - fp - fn
    present = union > 0
    return ClassScores(
        tp=tp, gt_pixels=gt, pred_pixels=pred, fp=fp, fn=fn, tn=tn, present=present,
        iou=_ratio(tp, union),
        precision=_ratio(tp, pred),
        recall=_ratio(tp, gt),
        fpr=np.where(present, _ratio(fp, fp + tn), np.nan),
        fnr=_ratio(fn, gt),
        fp_union=_ratio(fp, union),
        fn_union=_ratio(fn, union),
        invalid_pixels=int(confusion[:, c].sum()),
    )


def _mean(values: np.ndarray, present: np.ndarray) -> float:
    chosen = values[present]
    chosen = chosen[~np.isnan(chosen)]
    return float(chosen.mean()) if chosen.size else float("nan")


def summary_scores(scores: ClassScores) -> dict[str, float | int]:
    """Dataset-level scores of :func:`class_scores`' output (fractions, NaN when undefined).

    ``miou``, ``mean_precision``, ``mean_accuracy`` (mean recall), ``mean_fpr``, ``mean_fnr``,
    ``mean_fp_union``, ``mean_fn_union``: means over the present classes with a defined value.
    ``pixel_accuracy``: TP / labelled pixels. ``fwiou``: IoU weighted by ground-truth frequency
    (FCN). ``classes_present``: how many classes the means run over.
    """
    s = scores
    total = int(s.gt_pixels.sum())
    weights = s.gt_pixels / total if total else np.zeros(s.gt_pixels.shape)
    has_gt = s.gt_pixels > 0
    return {
        "miou": _mean(s.iou, s.present),
        "pixel_accuracy": float(s.tp.sum() / total) if total else float("nan"),
        "mean_accuracy": _mean(s.recall, s.present),
        "mean_precision": _mean(s.precision, s.present),
        "fwiou": float((weights[has_gt] * s.iou[has_gt]).sum()) if total else float("nan"),
        "mean_fpr": _mean(s.fpr, s.present),
        "mean_fnr": _mean(s.fnr, s.present),
        "mean_fp_union": _mean(s.fp_union, s.present),
        "mean_fn_union": _mean(s.fn_union, s.present),
        "classes_present": int(s.present.sum()),
        "labelled_pixels": total,
    }


def image_miou(confusion: np.ndarray) -> float:
    """Mean IoU of one image over the classes in its ground truth or prediction (NaN if none)."""
    scores = class_scores(confusion)
    return _mean(scores.iou, scores.present)


def vanished_classes(
    confusion: np.ndarray,
    *,
    min_share: float = VANISHED_MIN_SHARE,
    max_iou: float = VANISHED_MAX_IOU,
) -> tuple[np.ndarray, np.ndarray]:
    """Which ground-truth classes of one image count, and which of them vanished.

    Parameters
    ----------
    confusion : (C, C + 1) int64 array
        The confusion matrix of a single image.
    min_share : float
        A class is *eligible* when it covers at least this share (> 0 pixels) of the
        image's labelled pixels (default 0.1 %).
    max_iou : float
        An eligible class has *vanished* when its IoU in this image is below this (0.1).

    Returns
    -------
    eligible, vanished : (C,) bool arrays
    """
    scores = class_scores(confusion)
    gt = scores.gt_pixels
    total = gt.sum()
    eligible = (gt > 0) & (gt >= min_share * total)
    vanished = eligible & (scores.iou < max_iou)
    return eligible, vanished
