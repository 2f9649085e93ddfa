"""Bilinear resampling with ``align_corners=False`` (as torch's F.interpolate), in numpy."""
from __future__ import annotations

from functools import lru_cache

import numpy as np


def _axis_weights(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and weight of i1 for each output index along one axis."""
    scale = size_in / size_out
    src = (np.arange(size_out, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.maximum(src, 0.0)  # torch clamps negative source coordinates to 0
    i0 = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    i1 = np.minimum(i0 + 1, size_in - 1)
    frac = (src - i0).astype(np.float32)
    return i0, i1, frac


@lru_cache(maxsize=64)
def interpolation_matrix(size_in: int, size_out: int) -> np.ndarray:
    """The ``size_out x size_in`` matrix of 1-D bilinear interpolation (two taps a row)."""
    i0, i1, frac = _axis_weights(size_in, size_out)
    matrix = np.zeros((size_out, size_in), dtype=np.float32)
    rows = np.arange(size_out)
    np.add.at(matrix, (rows, i0), 1.0 - frac)
    np.add.at(matrix, (rows, i1), frac)
    matrix.setflags(write=False)
    return matrix


def resize_bilinear(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize ``maps`` (C x h x w) to C x H x W, bilinear, ``align_corners=False``.

    Agrees with ``torch.nn.functional.interpolate(..., mode="bilinear", align_corners=False)``
    (no antialiasing) to float32 rounding, for up- and down-sampling.

    Parameters
    ----------
    maps : ndarray, shape (C, h, w)
    size : (H, W)

    Returns
    -------
    ndarray, shape (C, H, W), float32
    """
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3:
        raise ValueError(f"maps must be C x h x w, got shape {maps.shape}")
    out_h, out_w = int(size[0]), int(size[1])
    _, in_h, in_w = maps.shape
    if (in_h, in_w) == (out_h, out_w):
        return maps.copy()
    # Separable: two small matrix products beat gathers by ~10x (the matrices are cached).
    cols = maps @ interpolation_matrix(in_w, out_w).T
    return np.matmul(interpolation_matrix(in_h, out_h), cols)
