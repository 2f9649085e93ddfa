"""Splat, blur and slice on a built :class:`~.lattice.Lattice`: ``K values`` as pydensecrf.

pydensecrf's ``Permutohedral::compute`` (float32):

* splat: ``values[o] += w * in[i]`` for every pixel i in order and vertex j = 0..d;
* blur: for j = 0..d, every row: ``new = old + 0.5 * (n1 + n2)`` (a missing neighbour is
  the zero row), rows swapped after each direction;
* slice: ``out[i] = sum_j (w_j * alpha) * v_j`` (``sseCompute``, more than two channels)
  or ``sum_j (w_j * v_j) * alpha`` (``seqCompute``, one or two channels).

Two implementations compute exactly these float32 operations in this order, so they agree
bit for bit with each other and with pydensecrf:

* ``"segments"`` (default on CUDA): entries gathered by lattice point and summed with
  ``torch.segment_reduce`` (one thread per row and channel, a sequential loop: deterministic,
  no atomics), blur and slice as row gathers;
* ``"bags"`` (default on CPU): ``embedding_bag(mode="sum")``, which sums each bag's rows
  in order, for the splat and the blur pairs; the slice vertex by vertex. CPU gathers of short
  rows cost ~45 ns a row in ``index_select`` whatever the table size, and every fresh tensor
  above glibc's mmap threshold (32 MB) is page-faulted anew (35 ms for 45 MB, measured): this
  path reuses caller-owned buffers (``workspace``) and keeps temporaries at P x L.

Both only gather (never scatter-add with atomics), so an image's result is the same alone or
in a batch and from run to run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .lattice import Lattice

__all__ = ["permutohedral_filter"]

METHODS = ("segments", "bags")


def permutohedral_filter(
    lattice: Lattice,
    values: torch.Tensor,
    *,
    alpha_last: bool | torch.Tensor = False,
    method: str | None = None,
    workspace: dict | None = None,
) -> torch.Tensor:
    """``K values`` with the permutohedral lattice (splat, blur along d+1 directions, slice).

    Parameters
    ----------
    lattice : Lattice
    values : Tensor, shape (P, L), float32
        One row per lattice pixel, on the lattice's device.
    alpha_last : bool or Tensor of shape (P,), bool
        pydensecrf's slicing path per pixel: True for ``(w * v) * alpha`` (its normalisation
        and CRFs with C <= 2 labels), False for ``(w * alpha) * v``.
    method : {"segments", "bags"}, optional
        Default: "bags" on CPU, "segments" elsewhere. Same result bit for bit.
    workspace : dict, optional
        Scratch buffers the "bags" method may keep and reuse between calls of one caller
        (same lattice); never shared between threads.

    Returns
    -------
    Tensor, shape (P, L), float32
    """
    if values.ndim != 2 or values.shape[0] != lattice.n_pixels or values.dtype != torch.float32:
        raise ValueError(f"values must be ({lattice.n_pixels}, L) float32, found {tuple(values.shape)} {values.dtype}")
    if values.device != lattice.device:
        raise ValueError(f"values are on {values.device}, the lattice on {lattice.device}")
    method = method or ("bags" if values.device.type == "cpu" else "segments")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, found {method!r}")
    values = values.contiguous()
    weight, after = _slice_weights(lattice, alpha_last)
    if method == "segments":
        rows = _splat_segments(lattice, values)
        rows = _blur(lattice, rows, bags=False)
        return _slice_gather(lattice, rows, weight, after)
    space = workspace if workspace is not None else {}
    rows = _splat_bags(lattice, values, space)
    rows = _blur(lattice, rows, bags=True)
    return _slice_by_vertex(lattice, rows, weight, after, space)


def _slice_weights(lattice: Lattice, alpha_last) -> tuple[torch.Tensor, object]:
    """Per-vertex slice weights and the factor applied after the product.

    ``(w * alpha, None)`` for the SSE path, ``(w, alpha)`` for the sequential one, and per
    pixel ``(where(last, w, w * alpha), where(last, alpha, 1))`` for a mix (x * 1 is exact).
    """
    w, alpha = lattice.slice_weight, lattice.alpha
    if isinstance(alpha_last, bool):
        return (w, alpha) if alpha_last else (lattice.slice_weight_alpha, None)
    mixed = torch.where(alpha_last[:, None], w, lattice.slice_weight_alpha)
    after = torch.where(alpha_last, alpha, 1.0).to(torch.float32)
    return mixed, after


def _splat_segments(lattice: Lattice, values: torch.Tensor) -> torch.Tensor:
    """Rows [M+1, L]: row m+1 = sum over point m's entries of w * v, in pixel order.

    The data stays 2-D even for one channel: ``segment_reduce`` runs its sequential
    per-segment kernel on CUDA for 2-D data, CUB's tree reduction only for 1-D.
    """
    entries = values.index_select(0, lattice.splat_pixel)
    entries.mul_(lattice.splat_weight[:, None])
    return torch.segment_reduce(entries, "sum", offsets=lattice.splat_offsets, axis=0, unsafe=True)


def _splat_bags(lattice: Lattice, values: torch.Tensor, space: dict) -> torch.Tensor:
    """As :func:`_splat_segments`: products in pixel order into a reused buffer, then one bag
    per row (bag 0 empty) summed in order by ``embedding_bag``."""
    n, k = lattice.n_pixels, lattice.d + 1
    channels = values.shape[1]
    entries = _buffer(space, ("entries", channels), (n, k, channels), values)
    torch.mul(values[:, None, :], lattice.slice_weight[:, :, None], out=entries)
    starts = lattice.splat_offsets[:-1]
    return F.embedding_bag(lattice.splat_entry, entries.view(n * k, channels), starts, mode="sum")


def _blur(lattice: Lattice, rows: torch.Tensor, *, bags: bool) -> torch.Tensor:
    """Directions 0..d in order: ``new = old + 0.5 * (n1 + n2)``.

    ``add(old, s, alpha=0.5)`` may fuse the multiply into the add; 0.5 * s is exact (short of
    subnormals), so the result is the separate multiply and add of pydensecrf.
    """
    n_rows = lattice.n_points + 1
    for j in range(lattice.d + 1):
        pairs = lattice.blur_index[j]
        if bags:  # bags of two rows: (0 + n1) + n2 = n1 + n2
            both = F.embedding_bag(pairs.view(n_rows, 2), rows, mode="sum")
        else:
            picked = rows.index_select(0, pairs).view(n_rows, 2, -1)
            both = picked[:, 0] + picked[:, 1]
        rows = torch.add(rows, both, alpha=0.5)
    return rows


def _slice_gather(lattice: Lattice, rows: torch.Tensor, weight: torch.Tensor, after) -> torch.Tensor:
    """``out = t_0 + t_1 + ... + t_d`` with ``t_j = weight_j * v_j [* after]``, one gather."""
    n, k = lattice.n_pixels, lattice.d + 1
    picked = rows.index_select(0, lattice.slice_index.view(-1)).view(n, k, -1)
    picked.mul_(weight[:, :, None])
    if after is not None:
        picked.mul_(after if isinstance(after, float) else after[:, None, None])
    out = picked[:, 0] + picked[:, 1]
    for j in range(2, k):
        out.add_(picked[:, j])
    return out


def _slice_by_vertex(lattice: Lattice, rows: torch.Tensor, weight: torch.Tensor, after, space: dict) -> torch.Tensor:
    """As :func:`_slice_gather`, vertex by vertex into P x L buffers."""
    n, k, channels = lattice.n_pixels, lattice.d + 1, rows.shape[1]
    index = space.get("slice_t")
    if index is None:
        index = space["slice_t"] = lattice.slice_index.T.contiguous()
    out = torch.empty(n, channels, dtype=rows.dtype, device=rows.device)
    term = _buffer(space, ("term", channels), (n, channels), rows)
    for j in range(k):
        target = out if j == 0 else term
        torch.index_select(rows, 0, index[j], out=target)
        target.mul_(weight[:, j : j + 1])
        if after is not None:
            target.mul_(after if isinstance(after, float) else after[:, None])
        if j:
            out.add_(term)
    return out


def _buffer(space: dict, key, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A scratch tensor of ``shape`` kept in ``space`` under ``key`` (made on first use)."""
    buf = space.get(key)
    if buf is None or tuple(buf.shape) != shape:
        buf = space[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
    return buf
