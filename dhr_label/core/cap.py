"""Class-level average pooling (CAP, Appendix A.1) and cosine heat maps (Eq. 3)."""
from __future__ import annotations

import numpy as np

from ..params import OTParams


def cell_index(height: int, width: int, grid: tuple[int, int]) -> np.ndarray:
    """Feature cell of every image pixel, H x W int64 in ``[0, h * w)``.

    Cell (i, j) of an h x w map covers rows ``[i*H/h, (i+1)*H/h)`` and columns
    ``[j*W/w, (j+1)*W/w)`` (ALGORITHM.md, resampling conventions).
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


def class_centroids(features: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean feature of every class.

    Parameters
    ----------
    features : ndarray, shape (D, N)
    weights : ndarray, shape (G, N)

    Returns
    -------
    centroids : ndarray, shape (G, D), float32
        Zero for a class with no weight anywhere.
    present : ndarray, shape (G,), bool
        Whether the class had any weight.
    """
    mass = weights.sum(axis=1)
    present = mass > 0
    sums = weights @ features.T
    centroids = np.where(present[:, None], sums / np.maximum(mass, 1e-12)[:, None], 0.0)
    return centroids.astype(np.float32), present


def l2_normalise(vectors: np.ndarray, axis: int, eps: float = 1e-8) -> np.ndarray:
    """``vectors`` divided by their L2 norm along ``axis`` (zero vectors stay zero)."""
    norm = np.sqrt((vectors.astype(np.float32) ** 2).sum(axis=axis, keepdims=True))
    return vectors / np.maximum(norm, eps)


def cosine_maps(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Cosine similarity of every cell to every centroid, G x N float32.

    ``features`` is D x N, ``centroids`` G x D. Normalising once and one matrix product is
    10-100x faster than a broadcast ``cosine_similarity`` (PERFORMANCE-NOTES.md).
    """
    return (l2_normalise(centroids, 1) @ l2_normalise(features, 0)).astype(np.float32)


def minmax_rows(maps: np.ndarray, clip: float = OTParams.minmax_clip) -> np.ndarray:
    """Min-max normalise each row (class) of a G x N array to [0, 1]; span clipped at ``clip``."""
    low = maps.min(axis=1, keepdims=True)
    span = np.maximum(maps.max(axis=1, keepdims=True) - low, clip)
    return ((maps - low) / span).astype(np.float32)


def heat_maps(
    features: np.ndarray, weights: np.ndarray, *, clip: float = OTParams.minmax_clip
) -> tuple[np.ndarray, np.ndarray]:
    """CAP centroids and min-max normalised cosine heat maps of one feature map.

    Parameters
    ----------
    features : ndarray, shape (D, N)
    weights : ndarray, shape (G, N)
        From :func:`class_cell_fractions` on the same grid.

    Returns
    -------
    maps : ndarray, shape (G, N), float32 in [0, 1]
        Zero for a class without any weight (no centroid).
    centroids : ndarray, shape (G, D)
    """
    centroids, present = class_centroids(features, weights)
    maps = minmax_rows(cosine_maps(features, centroids), clip)
    maps[~present] = 0.0
    return maps, centroids
