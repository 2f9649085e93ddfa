"""Class-level average pooling (CAP, Appendix A.1) and cosine heat maps (Eq. 3)."""
from __future__ import annotations

import numpy as np

from ..params import OTParams
from .arrays import amax, amin, at_least, is_tensor, sqrt, total, where


def cell_index(height: int, width: int, grid: tuple[int, int]) -> np.ndarray:
    """Feature cell of every image pixel, H x W int64 in ``[0, h * w)``.

    Cell (i, j) of an h x w map covers rows ``[i*H/h, (i+1)*H/h)`` and columns
    ``[j*W/w, (j+1)*W/w)`` (docs/algorithm.md, resampling conventions).
    """
    grid_h, grid_w = grid
    rows = (np.arange(height, dtype=np.int64) * grid_h) // height
    cols = (np.arange(width, dtype=np.int64) * grid_w) // width
    return rows[:, None] * grid_w + cols[None, :]


def class_cell_fractions(
    mask: np.ndarray,
    classes: np.ndarray,
    grid: tuple[int, int],
    *,
    mode: str = "soft",
) -> np.ndarray:
    """Weight of every feature cell for every class, G x (h * w) float32.

    Parameters
    ----------
    mask : ndarray, shape (H, W), uint8
        Class ids; values not in ``classes`` (e.g. 255 = ignore) count for no class.
    classes : ndarray, shape (G,)
        The class ids to pool, ascending.
    grid : (h, w)
        The feature map's grid.
    mode : {"soft", "majority"}
        ``soft``: the fraction of the cell's image pixels labelled with the class (a class
        thinner than a cell keeps a positive weight). ``majority``: 1 for the most frequent
        label of the cell (ignore included, ties to the lower id), 0 otherwise — the released
        code, which drops classes thinner than a cell.
    """
    height, width = mask.shape
    n_cells = grid[0] * grid[1]
    cells = cell_index(height, width, grid).ravel()
    lookup = np.full(256, -1, dtype=np.int64)
    lookup[np.asarray(classes, dtype=np.int64)] = np.arange(len(classes))
    slot = lookup[mask.ravel()]
    pixels_per_cell = np.bincount(cells, minlength=n_cells).astype(np.float64)
    labelled = slot >= 0
    counts = np.bincount(
        slot[labelled] * n_cells + cells[labelled], minlength=len(classes) * n_cells
    ).reshape(len(classes), n_cells)
    if mode == "soft":
        return (counts / np.maximum(pixels_per_cell, 1.0)).astype(np.float32)
    if mode != "majority":
        raise ValueError(f"mode must be 'soft' or 'majority', got {mode!r}")
    unlabelled = pixels_per_cell - counts.sum(axis=0)
    winner = np.argmax(counts, axis=0)
    # >=: a tie with the unlabelled pixels goes to the class (the lower id, as documented).
    wins = (counts[winner, np.arange(n_cells)] >= unlabelled) & (counts.sum(axis=0) > 0)
    weights = np.zeros((len(classes), n_cells), dtype=np.float32)
    weights[winner[wins], np.nonzero(wins)[0]] = 1.0
    return weights


def class_centroids(features, weights):
    """Weighted mean feature of every class (numpy arrays or torch tensors, batched or not).

    Parameters
    ----------
    features : array, shape (..., D, N)
    weights : array, shape (..., G, N)

    Returns
    -------
    centroids : array, shape (..., G, D)
        Zero for a class with no weight anywhere.
    present : bool array, shape (..., G)
        Whether the class had any weight.
    """
    mass = total(weights, -1)
    present = mass > 0
    centroids = where(present, (weights @ features.mT) / at_least(mass, 1e-12), 0.0)
    return centroids, present[..., 0]


def l2_normalise(vectors, axis: int, eps: float = 1e-8):
    """``vectors`` divided by their L2 norm along ``axis`` (zero vectors stay zero)."""
    return vectors / at_least(sqrt(total(vectors**2, axis)), eps)


def cosine_maps(features, centroids):
    """Cosine similarity of every cell to every centroid, shape (..., G, N).

    ``features`` is (..., D, N), ``centroids`` (..., G, D). Normalising once and one matrix
    product is 10-100x faster than a broadcast ``cosine_similarity`` (docs/algorithm.md,
    performance).
    """
    return l2_normalise(centroids, -1) @ l2_normalise(features, -2)


def minmax(values, axis: int, clip: float = OTParams.minmax_clip, *, valid=None):
    """Min-max normalise ``values`` along ``axis`` to [0, 1]; the span is clipped at ``clip``.

    The denominator ``max - min`` is clipped (the released code's 1e-5), so a nearly constant
    row maps to nearly 0 rather than being blown up. ``valid`` (broadcastable bool): entries
    that count — padding of a batch never reaches a minimum or a maximum and comes out 0.
    numpy results are float32 (the core's dtype); tensors keep their dtype.
    """
    if valid is None:
        low, high = amin(values, axis), amax(values, axis)
    else:
        low = amin(where(valid, values, float("inf")), axis)
        high = amax(where(valid, values, float("-inf")), axis)
    out = (values - low) / at_least(high - low, clip)
    if valid is not None:
        out = where(valid, out, 0.0)
    return out if is_tensor(out) else out.astype(np.float32)


def minmax_rows(maps, clip: float = OTParams.minmax_clip):
    """Min-max normalise each row (class) of a G x N array over its cells."""
    return minmax(maps, -1, clip)


def heat_maps(features, weights, *, clip: float = OTParams.minmax_clip, cells=None, prototypes=None, weight: float = 0.0):
    """CAP centroids and min-max normalised cosine heat maps of one feature map (or a batch).

    Parameters
    ----------
    features : array, shape (..., D, N)
    weights : array, shape (..., G, N)
        From :func:`class_cell_fractions` on the same grid.
    cells : bool array, shape (..., 1, N), optional
        The valid cells of each image of a padded batch.
    prototypes : array, shape (..., G, D), optional
        Class prototypes blended into the centroids with ``weight``
        (:func:`blend_centroids`); without them, or with ``weight`` 0, the
        centroids are the image's own (the paper).

    Returns
    -------
    maps : array, shape (..., G, N), in [0, 1]
        Zero for a class without any weight (no centroid) and no prototype.
    centroids : array, shape (..., G, D)
    """
    centroids, present = class_centroids(features, weights)
    if prototypes is not None and weight > 0:
        centroids = blend_centroids(centroids, present, prototypes, weight)
        present = total(centroids * centroids, -1)[..., 0] > 0
    maps = minmax(cosine_maps(features, centroids), -1, clip, valid=cells)
    return where(present[..., None], maps, 0.0), centroids


def blend_centroids(local, present, prototypes, weight: float):
    """``(1 - weight) * l2(local) + weight * l2(prototype)`` per class (numpy or torch): the
    image's CAP centroids blended with dataset-level class prototypes (:mod:`~.prototypes`).

    Parameters
    ----------
    local : array, shape (..., G, D)
        The image's CAP centroids (:func:`~.cap.class_centroids`).
    present : bool array, shape (..., G)
        Whether a class had CAP weight in the image; one without takes its prototype alone.
    prototypes : array, shape (..., G, D)
        The prototypes of the same classes; a zero row (class never seen) keeps the local one.
    weight : float in [0, 1]

    Returns
    -------
    array, shape (..., G, D)
        Directions only matter (heat maps are cosines); a class with neither stays zero.

    Examples
    --------
    >>> local = np.array([[2.0, 0.0], [0.0, 0.0]])
    >>> proto = np.array([[0.0, 1.0], [0.0, 3.0]])
    >>> blend_centroids(local, np.array([True, False]), proto, 0.25).tolist()
    [[0.75, 0.25], [0.0, 1.0]]
    """
    unit_local = l2_normalise(local, -1)
    unit_proto = l2_normalise(prototypes, -1)
    has_proto = total(prototypes * prototypes, -1)[..., 0] > 0
    mixed = (1.0 - weight) * unit_local + weight * unit_proto
    own = where(present[..., None], unit_local, unit_proto)
    return where((present & has_proto)[..., None], mixed, own)
