"""The per-image confusion matrix every score is computed from."""
from __future__ import annotations

import numpy as np


def confusion_matrix(
    pred: np.ndarray | None, gt: np.ndarray, *, num_classes: int, ignore_index: int = 255
) -> np.ndarray:
    """Exact pixel counts of (ground-truth class, predicted class) pairs.

    Parameters
    ----------
    pred : (H, W) integer array or None
        Predicted class ids. Any value outside ``[0, num_classes)`` (the ``ignore_index``
        included) is a wrong prediction: it lands in the extra last column, so the pixel is a
        false negative of its ground-truth class and a false positive of none. ``None`` means
        "no prediction for this image": every labelled pixel is counted in that column.
    gt : (H, W) integer array
        Ground-truth class ids in ``[0, num_classes)``; ``ignore_index`` pixels are not counted.
    num_classes : int
        C, the number of classes of the dataset.
    ignore_index : int
        The ground-truth label that means "not labelled".

    Returns
    -------
    (C, C + 1) int64 array
        ``m[g, p]`` = number of pixels with ground truth ``g`` and prediction ``p``; column
        ``C`` counts the pixels whose prediction is not a class id.

    Raises
    ------
    ValueError
        When the shapes differ, or the ground truth holds an id that is neither a class nor
        ``ignore_index`` (the class list does not fit the data).

    Examples
    --------
    >>> gt = np.array([[0, 1], [1, 255]])
    >>> pred = np.array([[0, 1], [0, 1]])
    >>> confusion_matrix(pred, gt, num_classes=2).tolist()
    [[1, 0, 0], [1, 1, 0]]
    """
    if gt.ndim != 2:
        raise ValueError(f"expected a 2-D ground-truth mask, found shape {gt.shape}")
    if pred is not None and pred.shape != gt.shape:
        raise ValueError(
            f"prediction is {_hw(pred.shape)} but ground truth is {_hw(gt.shape)} (H x W)"
        )
    c = num_classes
    if gt.dtype == np.uint8 and (pred is None or pred.dtype == np.uint8) and c <= 256:
        counts, invalid_gt = _counts_uint8(pred, gt, c, ignore_index)
    else:
        counts, invalid_gt = _counts_general(pred, gt, c, ignore_index)
    if invalid_gt:
        labelled = gt != ignore_index
        found = np.unique(gt[labelled & ((gt < 0) | (gt >= c))])
        raise ValueError(
            f"ground truth holds ids {_ids(found)} outside the {c} classes "
            f"(0..{c - 1}, {ignore_index} = ignore)"
        )
    return counts


def _counts_uint8(pred, gt, c: int, ignore_index: int) -> tuple[np.ndarray, bool]:
    # One pass over the pixels: a histogram of (gt, pred) byte pairs, folded onto the classes.
    not_class_rows = np.ones(256, dtype=bool)
    not_class_rows[:c] = False
    if 0 <= ignore_index < 256:
        not_class_rows[ignore_index] = False
    out = np.zeros((c, c + 1), dtype=np.int64)
    if pred is None:
        hist = np.bincount(gt.ravel(), minlength=256)
        out[:, c] = hist[:c]
        return out, bool(hist[not_class_rows].any())
    joint = (gt.astype(np.uint16) << 8) | pred
    joint = np.bincount(joint.ravel(), minlength=65536).reshape(256, 256)
    out[:, :c] = joint[:c, :c]
    out[:, c] = joint[:c, c:].sum(axis=1)
    return out, bool(joint[not_class_rows].any())


def _counts_general(pred, gt, c: int, ignore_index: int) -> tuple[np.ndarray, bool]:
    # Any integer dtype: rows are the classes, then c = ignored, c + 1 = not a class.
    g = gt.astype(np.int64, copy=False)
    rows = np.where((g >= 0) & (g < c), g, np.where(g == ignore_index, c, c + 1))
    if pred is None:
        cols = c
    else:
        p = pred.astype(np.int64, copy=False)
        cols = np.where((p >= 0) & (p < c), p, c)
    counts = np.bincount((rows * (c + 1) + cols).ravel(), minlength=(c + 2) * (c + 1))
    counts = counts.reshape(c + 2, c + 1)
    return counts[:c].astype(np.int64, copy=False), bool(counts[c + 1].any())


def _hw(shape) -> str:
    return " x ".join(str(s) for s in shape)


def _ids(values: np.ndarray, limit: int = 8) -> str:
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return shown + (f", ... ({len(values)} distinct)" if len(values) > limit else "")
