"""Feature cells and image pixels: the resampling conventions of docs/algorithm.md.

Image-sized outputs are exactly H x W of the image. Cell (i, j) of an h x w map covers rows
``[i*H/h, (i+1)*H/h)`` and columns ``[j*W/w, (j+1)*W/w)``; bilinear resizes use
``align_corners=False``.

A WSS layer (~1,300 channels) is never resized itself: Steps 2-3 need only sums of its resized
cells (CAP), dot products with them (cosines) and their norms, which :func:`resize_adjoint` and
:func:`resized_norms` give from the layer on its own grid — exactly, at a quarter of the work
and without a second copy of the layer.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F


def resize(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``maps`` (... x h x w) resized to ... x H x W, bilinear, ``align_corners=False``.

    ``torch.nn.functional.interpolate`` without antialiasing; the dtype and device of ``maps``
    are kept (floating point). A map already of that size is returned as it is (not copied:
    the stages never write into their inputs).

    Examples
    --------
    >>> resize(torch.tensor([[[0.0, 1.0]]]), (1, 4)).tolist()
    [[[0.0, 0.25, 0.75, 1.0]]]
    """
    if maps.ndim < 2:
        raise ValueError(f"maps must be ... x h x w, got shape {tuple(maps.shape)}")
    if not maps.is_floating_point():
        raise ValueError(f"maps must be floating point, got {maps.dtype}")
    size = (int(size[0]), int(size[1]))
    if tuple(maps.shape[-2:]) == size:
        return maps
    flat = maps.reshape(1, -1, *maps.shape[-2:])
    return F.interpolate(flat, size=size, mode="bilinear", align_corners=False).reshape(*maps.shape[:-2], *size)


@lru_cache(maxsize=64)
def _taps(size_in: int, size_out: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """1-D bilinear interpolation, ``align_corners=False``: per output index its two source
    indices (the second clamped to the last) and the weight of the second, in float64
    (source coordinates below 0 clamped to 0, as ``interpolate``)."""
    src = ((torch.arange(size_out, dtype=torch.float64) + 0.5) * (size_in / size_out) - 0.5).clamp(min=0.0)
    low = src.floor().long().clamp(max=size_in - 1)
    high = (low + 1).clamp(max=size_in - 1)
    return low.to(device), high.to(device), (src - low).to(device)


@lru_cache(maxsize=64)
def _matrix(size_in: int, size_out: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The ``size_out x size_in`` matrix of 1-D bilinear interpolation (two taps a row)."""
    low, high, frac = (t.cpu() for t in _taps(size_in, size_out, torch.device("cpu")))
    matrix = torch.zeros(size_out, size_in, dtype=torch.float64)
    rows = torch.arange(size_out)
    matrix.index_put_((rows, low), 1.0 - frac, accumulate=True)
    matrix.index_put_((rows, high), frac, accumulate=True)
    return matrix.to(device, dtype)


def resize_adjoint(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The adjoint of :func:`resize` from ``size`` (h, w): ``... x H x W`` to ``... x h x w``.

    For weights ``W`` on the resized grid, ``sum_n W[n] * resize(F)[n] = sum_m
    resize_adjoint(W)[m] * F[m]``: CAP of a resized feature map, computed on its own grid.
    Interpolation rows sum to one, so the adjoint keeps the total weight.

    Examples
    --------
    >>> resize_adjoint(torch.tensor([[[0.0, 1.0, 1.0, 0.0]]]), (1, 2)).tolist()
    [[[1.0, 1.0]]]
    """
    height, width = maps.shape[-2:]
    if (height, width) == tuple(size):
        return maps
    rows = _matrix(size[0], height, maps.device, maps.dtype)  # H x h
    cols = _matrix(size[1], width, maps.device, maps.dtype)  # W x w
    return rows.mT @ (maps @ cols)


def resized_norms(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """L2 norms of the cells of ``resize(features, size)`` without resizing ``features``.

    Parameters
    ----------
    features : tensor, shape (B, D, h, w), floating
    size : (H, W)

    Returns
    -------
    tensor, shape (B, H, W)

    Notes
    -----
    A resized cell is ``sum_k w_k F[a_k]`` over four source cells (two rows a, b times two
    columns c, d; b = a + 1 or a clamped, likewise d), so its squared norm is
    ``sum_kl w_k w_l <F[a_k], F[a_l]>``: the dot products of each source cell with itself and
    with its right, lower, lower-right neighbours and of its right neighbour with its lower
    one — five h x w maps, one pass over the features.
    """
    h, w = features.shape[-2:]
    if (h, w) == tuple(size):
        return torch.linalg.vector_norm(features, dim=1)
    f = features

    def dot(a, b):
        return torch.linalg.vecdot(a, b, dim=1)

    s = dot(f, f)
    right, down, diag, anti = s.clone(), s.clone(), s.clone(), s.clone()
    # A pair clamped at the last row or column is a cell with itself or a one-axis neighbour.
    right[..., :, :-1] = dot(f[..., :, :-1], f[..., :, 1:])
    down[..., :-1, :] = dot(f[..., :-1, :], f[..., 1:, :])
    diag[..., :-1, :-1] = dot(f[..., :-1, :-1], f[..., 1:, 1:])
    anti[..., :-1, :-1] = dot(f[..., :-1, 1:], f[..., 1:, :-1])
    diag[..., -1, :-1] = anti[..., -1, :-1] = right[..., -1, :-1]
    diag[..., :-1, -1] = anti[..., :-1, -1] = down[..., :-1, -1]
    a, b, beta = _taps(h, size[0], f.device)
    c, d, alpha = _taps(w, size[1], f.device)
    beta, alpha = beta.to(f.dtype)[:, None], alpha.to(f.dtype)[None, :]

    def at(grid, rows, cols):
        return grid.index_select(-2, rows).index_select(-1, cols)

    w00, w01, w10, w11 = (1 - beta) * (1 - alpha), (1 - beta) * alpha, beta * (1 - alpha), beta * alpha
    square = (w00 * w00 * at(s, a, c) + w01 * w01 * at(s, a, d) + w10 * w10 * at(s, b, c) + w11 * w11 * at(s, b, d)
              + 2 * (w00 * w01 * at(right, a, c) + w10 * w11 * at(right, b, c) + w00 * w10 * at(down, a, c)
                     + w01 * w11 * at(down, a, d) + w00 * w11 * at(diag, a, c) + w01 * w10 * at(anti, a, c)))
    return square.clamp(min=0.0).sqrt()


def cell_index(height: int, width: int, grid: tuple[int, int], device=None) -> torch.Tensor:
    """Feature cell of every image pixel, H x W int64 in ``[0, h * w)``.

    Examples
    --------
    >>> cell_index(2, 4, (1, 2)).tolist()
    [[0, 0, 1, 1], [0, 0, 1, 1]]
    """
    grid_h, grid_w = grid
    rows = (torch.arange(height, device=device) * grid_h) // height
    cols = (torch.arange(width, device=device) * grid_w) // width
    return rows[:, None] * grid_w + cols[None, :]
