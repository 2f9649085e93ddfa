"""Triton kernels of one fused mean-field iteration: splat, blur, slice + update + softmax.

The host side (:mod:`.fused`) lays the lattices of a batch out as *instances* (one table row
each: where the instance's pixels, rows and index arrays start) and cuts the work into blocks
(one table row each: instance or image, first row or pixel, loop length). Every kernel is a
gather: each output element is written by one program and summed in a fixed order, so the
results do not depend on the grid, the batch or the run (no atomics).

Every float operation is the one the eager path (:mod:`.filtering`, :mod:`.softmax`) performs,
in its order: kernels are compiled with ``enable_fp_fusion=False`` (no multiply-add
contraction) and divide with ``div_rn`` (Triton's ``/`` is an approximate division), so the
marginals are the eager path's bit for bit. Triton is imported only when these kernels are
chosen (``--crf-kernels triton``); under ``TRITON_INTERPRET=1`` they run on CPU tensors.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .softmax import _C1, _C2, _EXP_HI, _EXP_LO, _INVLN2N, _LOG2EF, _P, _Q0, _Q1, _Q2, _UNDERFLOW

__all__ = ["IMAGE_COLUMNS", "INSTANCE_COLUMNS", "INTERPRETED", "blur_kernel", "splat_kernel", "update_kernel"]

#: Columns of the instance table (int64), in this order.
INSTANCE_COLUMNS = ("pixel", "row", "rows", "offsets", "schedule", "entries", "norm", "blur", "slice", "vertices")
_PIXEL, _ROW, _ROWS, _OFFSETS, _SCHEDULE, _ENTRIES, _NORM, _BLUR, _SLICE, _VERTICES = (tl.constexpr(i) for i in range(10))
_NC = tl.constexpr(len(INSTANCE_COLUMNS))
#: Columns of the image table (int64): first pixel, pixels, Gaussian and bilateral instance, alpha last.
IMAGE_COLUMNS = ("pixel", "pixels", "gauss", "bilat", "last")
_IC = tl.constexpr(len(IMAGE_COLUMNS))

# Eigen's pexp<Packet4f> and glibc's expf constants (softmax.py), as compile-time constants.
_K_EXP_HI, _K_EXP_LO, _K_LOG2EF = tl.constexpr(_EXP_HI), tl.constexpr(_EXP_LO), tl.constexpr(_LOG2EF)
_K_C1, _K_C2 = tl.constexpr(_C1), tl.constexpr(_C2)
_K_P0, _K_P1, _K_P2, _K_P3, _K_P4, _K_P5 = (tl.constexpr(p) for p in _P)
_K_INVLN2N, _K_Q0, _K_Q1, _K_Q2 = tl.constexpr(_INVLN2N), tl.constexpr(_Q0), tl.constexpr(_Q1), tl.constexpr(_Q2)
_K_UNDERFLOW = tl.constexpr(_UNDERFLOW)
_K_ROUND = tl.constexpr(float.fromhex("0x1.8p52"))  # x + 1.5 2^52 - 1.5 2^52: round half to even


@triton.jit
def splat_kernel(q, norm, entry, weight, offsets, schedule, rows, instances, blocks, S, SP: tl.constexpr,
                 BLOCK: tl.constexpr, UNROLL: tl.constexpr):
    """Row m of an instance = the sum over its entries, in pixel order, of ``(q n)[pixel] w``.

    ``blocks`` rows: (instance, first scheduled row, entries of its longest row). Rows are
    scheduled longest first, so a block's rows have similar lengths; the entry loads of
    ``UNROLL`` steps are independent and issued together, the adds stay in order.
    """
    pid = tl.program_id(0)
    inst = tl.load(blocks + pid * 3).to(tl.int64)
    start = tl.load(blocks + pid * 3 + 1)
    longest = tl.load(blocks + pid * 3 + 2)
    k = start + tl.arange(0, BLOCK)
    valid = k < tl.load(instances + inst * _NC + _ROWS)
    cols = tl.arange(0, SP)[None, :]
    colmask = cols < S
    row = tl.load(schedule + tl.load(instances + inst * _NC + _SCHEDULE) + k, mask=valid, other=0)
    bounds = offsets + tl.load(instances + inst * _NC + _OFFSETS) + row
    first = tl.load(bounds, mask=valid, other=0)
    count = tl.load(bounds + 1, mask=valid, other=0) - first
    entries = entry + tl.load(instances + inst * _NC + _ENTRIES) + first
    vertices = tl.load(instances + inst * _NC + _VERTICES).to(tl.int32)
    weights = weight + tl.load(instances + inst * _NC + _SLICE)
    norms = norm + tl.load(instances + inst * _NC + _NORM)
    values = q + tl.load(instances + inst * _NC + _PIXEL) * S
    acc = tl.zeros([BLOCK, SP], dtype=tl.float32)
    i = 0
    while i < longest:
        for u in tl.static_range(UNROLL):
            # Past a row's end every load gives 0 and the row adds 0 (exact: sums are >= 0).
            live = count > i + u
            e = tl.load(entries + (i + u), mask=live, other=0)  # pixel * (d+1) + vertex
            pix = e // vertices
            w = tl.load(weights + e, mask=live, other=0.0)
            n = tl.load(norms + pix, mask=live, other=0.0)
            v = tl.load(values + (pix.to(tl.int64) * S)[:, None] + cols, mask=live[:, None] & colmask, other=0.0)
            acc = acc + (v * n[:, None]) * w[:, None]
        i += UNROLL
    out = rows + (tl.load(instances + inst * _NC + _ROW) + row.to(tl.int64)) * S
    tl.store(out[:, None] + cols, acc, mask=valid[:, None] & colmask)


@triton.jit(do_not_specialize=["direction"])
def blur_kernel(src, dst, neighbours, instances, blocks, direction, S, SP: tl.constexpr, BLOCK: tl.constexpr):
    """One blur direction: ``dst[m] = src[m] + 0.5 (src[n1] + src[n2])`` (row 0, the zero row,
    is its own neighbour)."""
    pid = tl.program_id(0)
    inst = tl.load(blocks + pid * 3).to(tl.int64)
    start = tl.load(blocks + pid * 3 + 1)
    row0 = tl.load(instances + inst * _NC + _ROW)
    n_rows = tl.load(instances + inst * _NC + _ROWS)
    r = start + tl.arange(0, BLOCK)
    valid = r < n_rows
    cols = tl.arange(0, SP)
    mask = valid[:, None] & (cols < S)[None, :]
    pairs = neighbours + tl.load(instances + inst * _NC + _BLUR) + direction * 2 * n_rows
    n1 = tl.load(pairs + 2 * r, mask=valid, other=0).to(tl.int64)
    n2 = tl.load(pairs + 2 * r + 1, mask=valid, other=0).to(tl.int64)
    old = tl.load(src + (row0 + r)[:, None] * S + cols[None, :], mask=mask, other=0.0)
    a = tl.load(src + (row0 + n1)[:, None] * S + cols[None, :], mask=mask, other=0.0)
    b = tl.load(src + (row0 + n2)[:, None] * S + cols[None, :], mask=mask, other=0.0)
    tl.store(dst + (row0 + r)[:, None] * S + cols[None, :], old + 0.5 * (a + b), mask=mask)


@triton.jit
def _slice(rows, index, weight, norm, instances, inst, gp, valid, last, cols, colmask, alpha, S,
           D: tl.constexpr, BLOCK: tl.constexpr, SP: tl.constexpr):
    """``n K(n Q)`` at pixels ``gp`` for one lattice: the blurred rows sliced with the
    barycentric weights, ``(w alpha) v`` per vertex (``(w v) alpha`` where ``last``), summed
    over the vertices in order, times the pixel's normalisation."""
    local = gp - tl.load(instances + inst * _NC + _PIXEL)
    row0 = tl.load(instances + inst * _NC + _ROW)
    at = tl.load(instances + inst * _NC + _SLICE) + local * (D + 1)
    after = tl.where(last, alpha, 1.0)  # x * 1 is exact: one formula for both of pydensecrf's paths
    acc = tl.zeros([BLOCK, SP], dtype=tl.float32)
    for j in tl.static_range(D + 1):
        idx = tl.load(index + at + j, mask=valid, other=0).to(tl.int64)
        w = tl.load(weight + at + j, mask=valid, other=0.0)
        w = tl.where(last, w, w * alpha)
        v = tl.load(rows + (row0 + idx)[:, None] * S + cols[None, :], mask=valid[:, None] & colmask[None, :], other=0.0)
        acc = acc + (w[:, None] * v) * after[:, None]
    n = tl.load(norm + tl.load(instances + inst * _NC + _NORM) + local, mask=valid, other=0.0)
    return acc * n[:, None]


@triton.jit
def _eigen_pexp(x):
    """Eigen 3.3.9's SSE2 ``pexp<Packet4f>`` (softmax.eigen_pexp), float32 op by op."""
    v = tl.minimum(tl.maximum(x, _K_EXP_LO), _K_EXP_HI)
    fx = tl.floor(v * _K_LOG2EF + 0.5)
    v = (v - fx * _K_C1) - fx * _K_C2
    z = v * v
    y = v * _K_P0 + _K_P1
    y = y * v + _K_P2
    y = y * v + _K_P3
    y = y * v + _K_P4
    y = y * v + _K_P5
    y = (y * z + v) + 1.0
    scale = ((fx.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)
    return tl.maximum(y * scale, x)


@triton.jit
def _glibc_expf(x, table):
    """glibc's table-driven ``expf`` in float64, rounded once (softmax.glibc_expf)."""
    r = tl.maximum(x.to(tl.float64), -104.0) * _K_INVLN2N
    kd = (r + _K_ROUND) - _K_ROUND
    r = r - kd
    k = kd.to(tl.int64)
    s = tl.load(table + (k & 31)) * (((k >> 5) + 1023) << 52).to(tl.float64, bitcast=True)
    y = (r * _K_Q0 + _K_Q1) * (r * r) + (r * _K_Q2 + 1.0)
    return tl.where(x < _K_UNDERFLOW, 0.0, (y * s).to(tl.float32))


@triton.jit
def _lane(e, cols, lane: tl.constexpr, PAIRS: tl.constexpr, LAST: tl.constexpr):
    """One lane of Eigen's packet accumulator: even and odd packets apart, added, then the odd
    last packet (softmax._packet_sum). ``sum(where(cols == c, e, 0))`` is column c of ``e``
    exactly (one value and zeros)."""
    if PAIRS > 0:
        even = tl.sum(tl.where(cols[None, :] == lane, e, 0.0), axis=1)
        odd = tl.sum(tl.where(cols[None, :] == 4 * PAIRS + lane, e, 0.0), axis=1)
        for g in tl.static_range(1, PAIRS):
            even = even + tl.sum(tl.where(cols[None, :] == 4 * g + lane, e, 0.0), axis=1)
            odd = odd + tl.sum(tl.where(cols[None, :] == 4 * (PAIRS + g) + lane, e, 0.0), axis=1)
        acc = even + odd
        if LAST:
            acc = acc + tl.sum(tl.where(cols[None, :] == 8 * PAIRS + lane, e, 0.0), axis=1)
    else:
        acc = tl.sum(tl.where(cols[None, :] == lane, e, 0.0), axis=1)
    return acc


@triton.jit
def _eigen_sum(e, cols, BLOCK: tl.constexpr, PAIRS: tl.constexpr, LAST: tl.constexpr, TAIL: tl.constexpr):
    """Eigen's redux of a row in slot layout: lanes reduced as (l0 + l2) + (l1 + l3), then the
    scalar tail added one by one (softmax.softmax_slots)."""
    NPACKET: tl.constexpr = 4 * (2 * PAIRS + LAST)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    if NPACKET > 0:
        total = (_lane(e, cols, 0, PAIRS, LAST) + _lane(e, cols, 2, PAIRS, LAST)) + (
            _lane(e, cols, 1, PAIRS, LAST) + _lane(e, cols, 3, PAIRS, LAST)
        )
    for j in tl.static_range(TAIL):
        total = total + tl.sum(tl.where(cols[None, :] == NPACKET + j, e, 0.0), axis=1)
    return total


@triton.jit
def update_kernel(neg, q, rows_gauss, rows_bilat, index, weight, norm, instances, images, blocks, table,
                  alpha_gauss, alpha_bilat, w_gauss, w_bilat, S: tl.constexpr, SP: tl.constexpr, BLOCK: tl.constexpr,
                  PAIRS: tl.constexpr, LAST: tl.constexpr, TAIL: tl.constexpr, MESSAGES: tl.constexpr,
                  D_GAUSS: tl.constexpr, D_BILAT: tl.constexpr):
    """``Q = softmax(-U - (-w_g) n_g K_g(n_g Q) - (-w_b) n_b K_b(n_b Q))`` for a block of one
    image's pixels (only ``softmax(-U)`` without ``MESSAGES``), written over ``q``.

    ``images`` rows: (first pixel, pixels, Gaussian instance, bilateral instance, alpha last).
    ``neg`` is ``-U`` with -inf in the slots an image does not use (their Q is 0).
    """
    pid = tl.program_id(0)
    image = tl.load(blocks + pid * 3).to(tl.int64)
    start = tl.load(blocks + pid * 3 + 1)
    p = start + tl.arange(0, BLOCK)
    valid = p < tl.load(images + image * _IC + 1)
    gp = tl.load(images + image * _IC + 0) + p
    cols = tl.arange(0, SP)
    colmask = cols < S
    mask = valid[:, None] & colmask[None, :]
    t = tl.load(neg + gp[:, None] * S + cols[None, :], mask=mask, other=0.0)
    if MESSAGES:
        last = (tl.zeros([BLOCK], dtype=tl.int64) + tl.load(images + image * _IC + 4)) != 0
        gauss = _slice(rows_gauss, index, weight, norm, instances, tl.load(images + image * _IC + 2), gp, valid, last, cols,
                       colmask, alpha_gauss, S, D_GAUSS, BLOCK, SP)
        t = t - gauss * w_gauss
        bilat = _slice(rows_bilat, index, weight, norm, instances, tl.load(images + image * _IC + 3), gp, valid, last, cols,
                       colmask, alpha_bilat, S, D_BILAT, BLOCK, SP)
        t = t - bilat * w_bilat
    t = tl.where(colmask[None, :], t, float("-inf"))
    x = t - tl.max(t, axis=1)[:, None]
    NPACKET: tl.constexpr = 4 * (2 * PAIRS + LAST)
    e = tl.where(cols[None, :] < NPACKET, _eigen_pexp(x), _glibc_expf(x, table))
    total = _eigen_sum(e, cols, BLOCK, PAIRS, LAST, TAIL)
    tl.store(q + gp[:, None] * S + cols[None, :], tl.math.div_rn(e, total[:, None]), mask=mask)


def _interpreted() -> bool:
    """Whether Triton's interpreter runs these kernels (``TRITON_INTERPRET=1`` at import)."""
    return type(splat_kernel).__name__ == "InterpretedFunction"


INTERPRETED = _interpreted()
