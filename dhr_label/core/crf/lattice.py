"""The permutohedral lattice of Adams, Baek & Davis (2010) as pydensecrf builds it, batched.

A Gaussian filter over d-dimensional features is approximated by splatting every point's
value onto the d+1 vertices of its enclosing simplex of the permutohedral lattice A*_d,
blurring along the d+1 lattice directions with the kernel [1/2, 1, 1/2], and slicing back
with the same barycentric weights (Adams et al., Sec. 3-4). Everything below follows the
float32 code path that pydensecrf 1.1 runs on x86-64 (``permutohedral.cpp``, the
``SSE_PERMUTOHEDRAL`` branch: ``__SSE__`` is always defined there), operation by operation:

* elevation ``E f`` with the scale factors ``sqrt(2/3) (d+1) / sqrt((i+1)(i+2))``;
* the nearest remainder-0 point by rounding ``elevated / (d+1)`` half to even (SSE2's
  ``cvtps2dq`` under MXCSR round-to-nearest; a build with SSE4.1 uses ``roundps``, which
  rounds the same way), ranks by pairwise comparison, the "back to the plane" correction;
* barycentric weights with the wrap-around, vertex keys as C ``short`` (wrapping like a
  16-bit store), one lattice point per distinct key *that some pixel splats to*;
* blur neighbours ``key -/+ 1`` with ``+/- d`` in direction j (the last direction has no
  stored coordinate), a missing neighbour reading 0; ``alpha = 1 / (1 + 2^-d)`` at slicing.

One lattice holds the pixels of several images: the image index is a coordinate of the key,
so images never share a point. The build is sort-based (no hash table): keys are packed into
order-preserving int64 codes (:class:`_Packing`), one stable sort groups the splat entries by
point, points are numbered by first appearance (pydensecrf's hash-table order, which keeps
the gathers local), blur neighbours are found with ``searchsorted``. The filter
(:mod:`.filtering`) sums each point's entries one after the other in pixel order, which is
pydensecrf's order, with no atomics: an image's result does not depend on its batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .floats import f32

__all__ = ["Lattice", "SimplexCoordinates", "build_lattice", "simplex_coordinates"]

#: Largest packed code allowed before the key components are re-ranked (int64 headroom).
CODE_LIMIT = 2**62


def scale_factors(d: int) -> list[float]:
    """Diagonal of the elevation's scaling (p. 5-6 of Adams et al.), as float32 values.

    pydensecrf computes ``1.0 / sqrt((i+2)(i+1)) * inv_std_dev`` in double with a float
    ``inv_std_dev = sqrt(2/3) (d+1)`` and stores the product as float.
    """
    inv_std_dev = f32(math.sqrt(2.0 / 3.0) * (d + 1))
    return [f32(1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std_dev) for i in range(d)]


def slice_alpha(d: int) -> float:
    """pydensecrf's slicing constant ``1.0f / (1 + powf(2, -d))`` (float32)."""
    return float(np.float32(1.0) / np.float32(1.0 + 2.0**-d))


@dataclass(frozen=True)
class SimplexCoordinates:
    """Per point, the enclosing simplex: its d+1 vertex keys and barycentric weights.

    Attributes
    ----------
    keys : Tensor, shape (P, d+1, d), int32
        Vertex ``r`` of point ``p``: its first d lattice coordinates, as pydensecrf stores
        them (C ``short``: values wrap into [-32768, 32767]).
    weights : Tensor, shape (P, d+1), float32
        Barycentric weight of vertex ``r``.
    """

    keys: torch.Tensor
    weights: torch.Tensor


def simplex_coordinates(features: torch.Tensor) -> SimplexCoordinates:
    """The enclosing simplex of every feature vector (``Permutohedral::init``, SSE branch).

    Parameters
    ----------
    features : Tensor, shape (P, d), float32
        One row per point (pixel), already divided by the kernel widths (pydensecrf's
        features, e.g. ``x / sxy``).

    Returns
    -------
    SimplexCoordinates
    """
    n, d = features.shape
    dev = features.device
    inv = float(np.float32(1.0) / np.float32(d + 1))  # 1.0f / (d+1)
    # Elevate (y = E f): for j = d..1, elevated[j] = sm - j * cf, sm += cf; elevated[0] = sm.
    sf = scale_factors(d)
    elevated = [None] * (d + 1)
    sm = torch.zeros(n, dtype=torch.float32, device=dev)
    for j in range(d, 0, -1):
        cf = features[:, j - 1] * sf[j - 1]
        elevated[j] = sm - float(j) * cf
        sm = sm + cf
    elevated[0] = sm
    el = torch.stack(elevated, dim=1)  # [P, d+1]
    # Nearest remainder-0 point: round(elevated / (d+1)) half to even, times d+1.
    v = torch.round(el * inv)
    rem0 = v * float(d + 1)
    total = v[:, 0]
    for i in range(1, d + 1):
        total = total + v[:, i]  # small integers: exact, the order does not matter
    # Rank of each coordinate of the remainder (C++: for i < j, di < dj ? rank[i]++ : rank[j]++).
    delta = el - rem0
    less = delta[:, :, None] < delta[:, None, :]  # less[p, i, j] = di < dj
    upper = torch.ones(d + 1, d + 1, dtype=torch.bool, device=dev).triu(1)
    rank = (less & upper).sum(dim=2, dtype=torch.int32) + (~less & upper).sum(dim=1, dtype=torch.int32)
    # Back to the plane: shift the ranks by the coordinate sum, wrap into [0, d].
    rank += total.to(torch.int32)[:, None]
    shift = (rank < 0).to(torch.int32).sub_((rank >= d + 1).to(torch.int32)).mul_(d + 1)
    rank += shift
    rem0 = rem0 + shift.to(torch.float32)
    # Barycentric weights (p. 10): b[d - rank_i] += v_i, b[d - rank_i + 1] -= v_i, then
    # b[0] += 1 + b[d+1]. Each b[p] gets one + and one - term: fl(a - b) in either order.
    v = (el - rem0) * inv
    by_rank = torch.gather(v, 1, torch.argsort(rank, dim=1))  # by_rank[:, r]: v of rank r
    weights = torch.empty(n, d + 1, dtype=torch.float32, device=dev)
    weights[:, 0] = by_rank[:, d] + (1.0 - by_rank[:, 0])
    weights[:, 1:] = by_rank[:, :d].flip(1) - by_rank[:, 1:].flip(1)  # b[p] = v(d-p) - v(d-p+1)
    # Vertex r: rem0_i + canonical[r][rank_i], canonical[r][k] = r if k <= d - r else r - (d+1).
    r = torch.arange(d + 1, device=dev, dtype=torch.int32)
    canonical = r[:, None] - (d + 1) * (r[None, :] > d - r[:, None]).to(torch.int32)  # [r, k]
    keys = canonical.T[rank[:, :d]].transpose(1, 2)  # [P, d+1, d]: canonical[r, rank_i]
    keys = keys + rem0[:, None, :d].to(torch.int32)
    # float -> short as the C++ store: the low 16 bits (two's complement wrap).
    return SimplexCoordinates(keys.to(torch.int16).to(torch.int32), weights)


@dataclass(frozen=True)
class _Packing:
    """Order-preserving int64 codes of key tuples (image, k_0..k_{d-1}).

    Mixed radix over each component's range widened by ``margin`` (d for the key
    coordinates: a blur neighbour moves each by at most d, so its code is the point's code
    plus a constant and never carries into the next digit). When the product of the ranges
    exceeds ``code_limit`` the prefixes are re-ranked among the keys that occur
    (``vocabularies``), which keeps codes below E times one range.
    """

    lo: tuple[int, ...]
    hi: tuple[int, ...]
    vocabularies: tuple  # per component: sorted prefix codes to re-rank by, or None
    strides: tuple[int, ...] | None  # when packed directly: the place value of each component

    def encode(self, comps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes of the rows of ``comps`` ([Q, c] int) and whether each row can exist.

        A row with a component outside the built range, or a prefix no built key has, gets
        ``valid`` False (and an arbitrary code).
        """
        valid = torch.ones(comps.shape[0], dtype=torch.bool, device=comps.device)
        code = torch.zeros(comps.shape[0], dtype=torch.int64, device=comps.device)
        for c, (lo, hi, vocab) in enumerate(zip(self.lo, self.hi, self.vocabularies)):
            if vocab is not None:
                pos = torch.searchsorted(vocab, code).clamp_(max=len(vocab) - 1)
                valid &= vocab[pos] == code
                code = pos
            value = comps[:, c].to(torch.int64)
            valid &= (value >= lo) & (value <= hi)
            code = code * (hi - lo + 1) + (value - lo).clamp_(0, hi - lo)
        return code, valid


def _packing(comps: torch.Tensor, margin: list[int], code_limit: int) -> tuple[_Packing, torch.Tensor]:
    """A :class:`_Packing` for the rows of ``comps`` ([E, c] int) and their codes [E]."""
    lo = [v - m for v, m in zip(comps.amin(dim=0).tolist(), margin)]
    hi = [v + m for v, m in zip(comps.amax(dim=0).tolist(), margin)]
    spans = [h - l + 1 for l, h in zip(lo, hi)]
    vocabularies, size = [], 1
    code = torch.zeros(comps.shape[0], dtype=torch.int64, device=comps.device)
    for c, span in enumerate(spans):
        vocab = None
        if size * span > code_limit:
            # Too many combinations for int64: rank the prefixes that occur (at most E).
            vocab = torch.unique(code, sorted=True)
            code = torch.searchsorted(vocab, code)
            size = len(vocab)
        vocabularies.append(vocab)
        code = code * span + (comps[:, c].to(torch.int64) - lo[c])
        size *= span
    strides = None
    if all(v is None for v in vocabularies):
        strides = tuple(int(np.prod(spans[c + 1 :], dtype=object)) for c in range(len(spans)))
    return _Packing(tuple(lo), tuple(hi), tuple(vocabularies), strides), code


@dataclass(frozen=True)
class Lattice:
    """A built lattice: the gather indices and weights of splat, blur and slice.

    Build it with :func:`build_lattice`; :func:`.filtering.permutohedral_filter` applies the
    (unnormalised) permutohedral Gaussian ``K`` to any number of value channels. Index tensors are int32
    on CUDA (half the index traffic) and int64 on CPU by default (CPU ``index_select``
    measured faster with int64: 39 vs 56 ms for 518k rows of 11 floats); either works on
    either device (``build_lattice(..., index_dtype=...)``).

    Attributes
    ----------
    d : int
        Feature dimension.
    n_pixels, n_points : int
        P points filtered, M lattice points. Lattice row ``m + 1`` is point ``m``; row 0 is
        the zero row that a missing blur neighbour reads.
    splat_entry : Tensor, shape (P (d+1),), int
        Entries ``e = pixel * (d+1) + vertex`` sorted by lattice point, stable (pixel order
        within a point: pydensecrf's summation order).
    splat_pixel : Tensor, shape (P (d+1),), int
        ``splat_entry // (d+1)``.
    splat_weight : Tensor, shape (P (d+1),), float32
        Barycentric weight of each sorted entry.
    splat_offsets : Tensor, shape (M+2,), int64
        Bounds of each row's entries in the sorted order (row 0: empty).
    blur_index : Tensor, shape (d+1, 2 (M+1)), int
        Per direction, for rows 0..M, the rows of neighbours n1 and n2, interleaved.
    slice_index : Tensor, shape (P, d+1), int
        Row of each pixel's vertices.
    slice_weight : Tensor, shape (P, d+1), float32
        Barycentric weights (pydensecrf's ``barycentric_``).
    slice_weight_alpha : Tensor, shape (P, d+1), float32
        ``slice_weight * alpha`` (float32), the weights of pydensecrf's SSE slicing.
    """

    d: int
    n_pixels: int
    n_points: int
    splat_entry: torch.Tensor
    splat_pixel: torch.Tensor
    splat_weight: torch.Tensor
    splat_offsets: torch.Tensor
    blur_index: torch.Tensor
    slice_index: torch.Tensor
    slice_weight: torch.Tensor
    slice_weight_alpha: torch.Tensor

    @property
    def alpha(self) -> float:
        return slice_alpha(self.d)

    @property
    def device(self) -> torch.device:
        return self.slice_weight.device



def build_lattice(
    features: torch.Tensor, image_index: torch.Tensor, *, code_limit: int = CODE_LIMIT, index_dtype: torch.dtype | None = None
) -> Lattice:
    """Build the lattice of a batch of points (the pixels of one or more images).

    Parameters
    ----------
    features : Tensor, shape (P, d), float32
        Scaled features (position / sigma, colour / sigma), one row per point, images
        concatenated; within an image in pydensecrf's order (row-major pixels).
    image_index : Tensor, shape (P,), int
        Which image each point belongs to; points of different images never interact.
    code_limit : int, optional
        Largest packed key code; beyond it the key components are re-ranked (large images
        with small sigmas). Tests lower it to exercise that path.
    index_dtype : torch.int32 or torch.int64, optional
        Dtype of the index tensors; default int32 on CUDA, int64 elsewhere (see
        :class:`Lattice`). Tests take CUDA's int32 path on the CPU with it.

    Returns
    -------
    Lattice
        On the device of ``features``. Building synchronises with the host (sizes).
    """
    if features.ndim != 2 or features.dtype != torch.float32:
        raise ValueError(f"features must be (P, d) float32, got {tuple(features.shape)} {features.dtype}")
    if image_index.shape != features.shape[:1]:
        raise ValueError(f"image_index must be ({features.shape[0]},), got {tuple(image_index.shape)}")
    if index_dtype not in (None, torch.int32, torch.int64):
        raise ValueError(f"index_dtype must be torch.int32 or torch.int64, got {index_dtype}")
    n, d = features.shape
    coords = simplex_coordinates(features)
    # Entry e = pixel * (d+1) + r, pydensecrf's splat order. Key = (image, d coordinates).
    image = image_index.to(torch.int32)[:, None, None].expand(n, d + 1, 1)
    comps = torch.cat([image, coords.keys], dim=2).reshape(n * (d + 1), d + 1)
    packing, codes = _packing(comps, [0] + [d] * d, code_limit)
    points = _number_points(codes)
    # Index width: int32 halves the index traffic on CUDA; CPU index_select is faster with
    # int64 (measured: 39 vs 56 ms for 518k rows of 11 floats).
    index = index_dtype or (torch.int32 if features.device.type == "cuda" else torch.int64)
    zero = torch.zeros(1, dtype=torch.int64, device=features.device)
    blur = _blur_index(comps, packing, points, d)
    order = points.splat_order
    return Lattice(
        d, n, points.n_points,
        splat_entry=order.to(index),
        splat_pixel=torch.div(order, d + 1, rounding_mode="floor").to(index),
        splat_weight=coords.weights.reshape(-1).index_select(0, order),
        splat_offsets=torch.cat([zero, points.offsets]),
        blur_index=blur.to(index),
        slice_index=(points.point_of_entry + 1).view(n, d + 1).to(index),
        slice_weight=coords.weights,
        slice_weight_alpha=coords.weights * slice_alpha(d),
    )


@dataclass(frozen=True)
class _Points:
    """The distinct keys of the entries, numbered by first appearance (pydensecrf's hash
    table order, which keeps the gathers of splat, blur and slice local in memory)."""

    n_points: int
    codes: torch.Tensor  # [M] int64, sorted (for lookups)
    id_of_code: torch.Tensor  # [M] int64: point id of the code at each sorted position
    first_of_code: torch.Tensor  # [M] int64: the first entry with each code
    splat_order: torch.Tensor  # [E] int64: entries by point id, stable (pixel order)
    offsets: torch.Tensor  # [M+1] int64: bounds of each point's entries in splat_order
    point_of_entry: torch.Tensor  # [E] int64


def _number_points(codes: torch.Tensor) -> _Points:
    """Lattice points of entries with key ``codes`` [E] (one stable sort)."""
    dev, n_entries = codes.device, codes.shape[0]
    sorted_codes, order = torch.sort(codes, stable=True)
    point_codes, counts = torch.unique_consecutive(sorted_codes, return_counts=True)
    n_points = len(point_codes)
    starts = torch.cumsum(counts, 0) - counts
    # Stable sort: a point's first entry is its smallest; ids follow the first entries.
    first_of_code = order.index_select(0, starts)
    code_of_id = torch.argsort(first_of_code)
    arange_m = torch.arange(n_points, device=dev)
    id_of_code = torch.empty_like(code_of_id).scatter_(0, code_of_id, arange_m)
    # Reorder the sorted entries' segments by point id (their inner order stays pixel order).
    new_counts = counts.index_select(0, code_of_id)
    new_starts = torch.cumsum(new_counts, 0) - new_counts
    shift = torch.repeat_interleave(starts.index_select(0, code_of_id) - new_starts, new_counts)
    splat_order = order.index_select(0, shift + torch.arange(n_entries, device=dev))
    ids_sorted = torch.repeat_interleave(arange_m, new_counts)
    point_of_entry = torch.empty_like(ids_sorted).scatter_(0, splat_order, ids_sorted)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev), torch.cumsum(new_counts, 0)])
    return _Points(n_points, point_codes, id_of_code, first_of_code, splat_order, offsets, point_of_entry)


def _blur_index(comps: torch.Tensor, packing: _Packing, points: _Points, d: int) -> torch.Tensor:
    """Per direction j, rows (point id + 1, 0 = none) of the two neighbours of every point.

    pydensecrf: ``n1 = key - 1, n2 = key + 1`` in every stored coordinate except
    ``n1[j] = key[j] + d, n2[j] = key[j] - d``; for j = d (no stored coordinate) all d
    coordinates move by -1 / +1. The sums are stored as C shorts (they wrap).
    ``comps``: [E, d+1] (image, key) of every entry. Returns [d+1, 2 (M+1)] int64: for rows
    0..M, the rows of n1 and n2 interleaved (row 0, the zero row, has itself as neighbours).
    """
    m, dev = points.n_points, comps.device
    lo, hi = packing.lo[1:], packing.hi[1:]
    # Directly packed keys away from the short limits: a neighbour's code is the point's
    # code plus a constant (no wrap, no carry thanks to the margins of the packing).
    direct = packing.strides is not None and min(lo) >= -32768 and max(hi) <= 32767
    keys = None if direct else comps.index_select(0, points.first_of_code).to(torch.int64)
    out = torch.zeros(d + 1, m + 1, 2, dtype=torch.int64, device=dev)
    for j in range(d + 1):
        for side, (step, own) in enumerate(((-1, d), (1, -d))):
            shift = [own if k == j else step for k in range(d)]
            if direct:
                code = points.codes + sum(s * st for s, st in zip(shift, packing.strides[1:]))
                valid = None
            else:
                query = keys.clone()
                query[:, 1:] = (query[:, 1:] + torch.tensor(shift, device=dev)).to(torch.int16)
                code, valid = packing.encode(query)
            pos = torch.searchsorted(points.codes, code).clamp_(max=m - 1)
            found = points.codes.index_select(0, pos) == code
            if valid is not None:
                found &= valid
            row = torch.where(found, points.id_of_code.index_select(0, pos) + 1, torch.zeros_like(pos))
            out[j, 1 + points.id_of_code, side] = row
    return out.view(d + 1, 2 * (m + 1))
