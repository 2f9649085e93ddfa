"""pydensecrf's softmax over labels, bit for bit: Eigen's exp, glibc's ``expf``, Eigen's sum.

pydensecrf normalises every pixel with ``expAndNormalize`` (densecrf.cpp): subtract the
maximum, ``b.array().exp()``, divide by ``b.array().sum()``, on an Eigen ``VectorXf`` of the
C label values. A default pip build (gcc, no ``-march``) compiles it with SSE2 only, so Eigen
3.3.9 evaluates it as

* ``exp``: the first ``4 * (C // 4)`` values four at a time with Eigen's Cephes-style
  ``pexp<Packet4f>`` (arch/SSE/MathFunctions.h), the remaining ``C % 4`` with the scalar
  ``std::exp``, i.e. glibc's ``expf`` (the binary calls ``expf@plt``);
* ``sum``: packets accumulated in two interleaved registers (even and odd packets), added,
  an odd last packet added after, the four lanes reduced as ``(l0 + l2) + (l1 + l3)``
  (``predux`` without SSE3), then the scalar tail added one by one (Redux.h).

Both exps are written here from float32 / float64 IEEE operations that round the same way on
every device, so the marginals are the same on CPU and CUDA. To keep an image's sums
independent of the batch it is in, the labels of every image are placed in *slots* (columns)
such that one fixed sequence of additions over the slots performs, for every image, exactly
Eigen's additions for its own label count, plus additions of exact zeros (:class:`SlotLayout`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from .floats import f32

__all__ = ["SlotLayout", "eigen_pexp", "glibc_expf", "slot_layout", "softmax_slots"]


# Eigen 3.3.9 arch/SSE/MathFunctions.h, pexp<Packet4f>: Cephes constants as float literals.
_EXP_HI, _EXP_LO = f32(88.3762626647950), f32(-88.3762626647949)
_LOG2EF = f32(1.44269504088896341)
_C1, _C2 = f32(0.693359375), f32(-2.12194440e-4)
_P = tuple(
    f32(p) for p in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
)

# glibc 2.28+ sysdeps/ieee754/flt-32/e_expf.c with e_exp2f_data.c (N = 32, poly order 3).
_EXP2F_TAB = (
    0x3FF0000000000000, 0x3FEFD9B0D3158574, 0x3FEFB5586CF9890F, 0x3FEF9301D0125B51,
    0x3FEF72B83C7D517B, 0x3FEF54873168B9AA, 0x3FEF387A6E756238, 0x3FEF1E9DF51FDEE1,
    0x3FEF06FE0A31B715, 0x3FEEF1A7373AA9CB, 0x3FEEDEA64C123422, 0x3FEECE086061892D,
    0x3FEEBFDAD5362A27, 0x3FEEB42B569D4F82, 0x3FEEAB07DD485429, 0x3FEEA47EB03A5585,
    0x3FEEA09E667F3BCD, 0x3FEE9F75E8EC5F74, 0x3FEEA11473EB0187, 0x3FEEA589994CCE13,
    0x3FEEACE5422AA0DB, 0x3FEEB737B0CDC5E5, 0x3FEEC49182A3F090, 0x3FEED503B23E255D,
    0x3FEEE89F995AD3AD, 0x3FEEFF76F2FB5E47, 0x3FEF199BDD85529C, 0x3FEF3720DCEF9069,
    0x3FEF5818DCFBA487, 0x3FEF7C97337B9B5F, 0x3FEFA4AFA2A490DA, 0x3FEFD0765B6E4540,
)
# tab[i] + (i << 47) is the bit pattern of 2^(i/32) itself.
_EXP2_I32 = np.array([t + (i << 47) for i, t in enumerate(_EXP2F_TAB)], dtype=np.int64).view(np.float64)
_INVLN2N = float.fromhex("0x1.71547652b82fep+0") * 32
_Q0 = float.fromhex("0x1.c6af84b912394p-5") / 32 / 32 / 32
_Q1 = float.fromhex("0x1.ebfce50fac4f3p-3") / 32 / 32
_Q2 = float.fromhex("0x1.62e42ff0c52d6p-1") / 32
_UNDERFLOW = float.fromhex("-0x1.9fe368p6")  # below log(2^-150): expf returns +0


@cache
def _exp2_table(device: torch.device) -> torch.Tensor:
    """``2^(i/32)``, i < 32, on ``device`` (a constant, copied there once, not per call)."""
    return torch.as_tensor(_EXP2_I32, device=device)


def eigen_pexp(x: torch.Tensor) -> torch.Tensor:
    """Eigen 3.3.9's SSE2 ``pexp<Packet4f>``, element-wise, float32 operation by operation.

    ``pmadd`` is a multiply then an add (no FMA without ``-mfma``); the SSE2 floor is a
    truncation corrected by one, which equals ``floor`` for every float.

    Parameters
    ----------
    x : Tensor, float32, any shape

    Returns
    -------
    Tensor, float32, the shape of ``x``
    """
    v = torch.clamp(x, _EXP_LO, _EXP_HI)
    fx = (v * _LOG2EF).add_(0.5).floor_()
    t = fx * _C1
    v.sub_(t).sub_(torch.mul(fx, _C2, out=t))
    z = torch.mul(v, v, out=t)
    y = (v * _P[0]).add_(_P[1])
    for p in _P[2:]:
        y.mul_(v).add_(p)
    y.mul_(z).add_(v).add_(1.0)
    # 2^fx from the exponent bits, as the SSE code builds it (_mm_slli_epi32(n + 127, 23)).
    scale = fx.to(torch.int32).add_(127).bitwise_left_shift_(23).view(torch.float32)
    return torch.maximum(y.mul_(scale), x, out=y)


def glibc_expf(x: torch.Tensor) -> torch.Tensor:
    """glibc's ``expf`` (the table-driven one of glibc >= 2.28), in float64, rounded once.

    ``k = round(x * 32 / ln 2)``, ``2^(k/32)`` from the 32-entry table, a cubic in the
    remainder. glibc's FMA build (chosen at run time on CPUs with FMA) fuses the polynomial's
    multiply-adds; this unfused version gave the identical float on 20 million samples in
    [-30, 0], the range the softmax sees (the double results differ by far less than half a
    float ulp). Results below ``log(2^-150)`` are 0, as glibc returns.

    Parameters
    ----------
    x : Tensor, float32, any shape (finite or -inf)

    Returns
    -------
    Tensor, float32, the shape of ``x``
    """
    # Below -104 glibc returns 0 (masked at the end); clamping keeps the integers finite.
    r = x.double().clamp_(min=-104.0).mul_(_INVLN2N)
    kd = torch.round(r)  # glibc: z + 0x1.8p52 - 0x1.8p52, round half to even as well
    r.sub_(kd)
    k = kd.to(torch.int64)
    s = _exp2_table(x.device)[k & 31]
    s.mul_(k.bitwise_right_shift_(5).add_(1023).bitwise_left_shift_(52).view(torch.float64))  # 2^(k div 32)
    y = (r * _Q0).add_(_Q1)
    r2 = r * r
    y.mul_(r2).add_(torch.mul(r, _Q2, out=r2).add_(1.0))  # (Q0 r + Q1) r^2 + (Q2 r + 1)
    out = y.mul_(s).to(torch.float32)
    return out.masked_fill_(x < _UNDERFLOW, 0.0)


@dataclass(frozen=True)
class SlotLayout:
    """Where each image's labels sit among the slots (columns) of the mean-field state.

    Slots ``[0, n_packet)`` hold the values Eigen treats as packets, in groups of four:
    ``pairs`` even-packet groups, ``pairs`` odd-packet groups, then one "last packet" group
    when ``last``; slots ``[n_packet, n_slots)`` hold the scalar tail. An image with C
    labels has ``C // 4`` packets: packet k < 2 * (C // 8) goes to even group k // 2 or odd
    group k // 2, an odd last packet to the last group (a single packet counts as last:
    adding it to two zero registers is exact), the ``C % 4`` tail values to the first tail
    slots. Slots an image does not use are empty (their exp is exactly 0).

    Attributes
    ----------
    pairs : int
    last : bool
    tail : int
    slots : tuple of tuple of int
        Per image, the slot of each of its labels, in label order.
    """

    pairs: int
    last: bool
    tail: int
    slots: tuple[tuple[int, ...], ...]

    @property
    def n_packet(self) -> int:
        return 4 * (2 * self.pairs + int(self.last))

    @property
    def n_slots(self) -> int:
        return self.n_packet + self.tail

    @property
    def dense(self) -> bool:
        """Whether every image fills every slot (no empty slot to mask)."""
        return all(len(s) == self.n_slots for s in self.slots)


def slot_layout(label_counts: list[int]) -> SlotLayout:
    """The :class:`SlotLayout` of a batch whose images have ``label_counts`` labels (>= 1)."""
    pairs = max(c // 8 for c in label_counts)
    last = any((c // 4) % 2 == 1 for c in label_counts)
    tail = max(c % 4 for c in label_counts)
    n_packet = 4 * (2 * pairs + int(last))
    slots = []
    for count in label_counts:
        n = count // 4
        image = []
        for k in range(n):
            if k < 2 * (n // 2):
                group = k // 2 if k % 2 == 0 else pairs + k // 2
            else:
                group = 2 * pairs  # the odd last packet
            image.extend(range(4 * group, 4 * group + 4))
        image.extend(range(n_packet, n_packet + count % 4))
        slots.append(tuple(image))
    return SlotLayout(pairs, last, tail, tuple(slots))


def _packet_sum(e: torch.Tensor, layout: SlotLayout) -> torch.Tensor:
    """Eigen's redux over the packet slots: [P, n_packet] -> [P] (zeros when none)."""
    if layout.n_packet == 0:
        return torch.zeros(e.shape[0], dtype=e.dtype, device=e.device)

    def group(g: int) -> torch.Tensor:
        return e[:, 4 * g : 4 * g + 4]

    acc = None
    if layout.pairs:
        even, odd = group(0), group(layout.pairs)
        for g in range(1, layout.pairs):
            even = even + group(g)
            odd = odd + group(layout.pairs + g)
        acc = even + odd
    if layout.last:
        acc = group(2 * layout.pairs) if acc is None else acc + group(2 * layout.pairs)
    return (acc[:, 0] + acc[:, 2]) + (acc[:, 1] + acc[:, 3])


def softmax_slots(logits: torch.Tensor, layout: SlotLayout, empty: torch.Tensor | None = None) -> torch.Tensor:
    """pydensecrf's ``expAndNormalize`` of every row, in slot layout.

    Parameters
    ----------
    logits : Tensor, shape (P, n_slots), float32
        Empty slots may hold any value; they come out 0.
    layout : SlotLayout
    empty : Tensor, shape (P, n_slots), bool, optional
        True at the slots of a row that its image does not use; needed unless
        ``layout.dense``.

    Returns
    -------
    Tensor, shape (P, n_slots), float32
        Per row ``exp(x - max) / sum``, the sum in Eigen's order over the image's labels.
    """
    if empty is not None:
        # -inf: no part in the maximum, and exp exactly 0 in both exps (pexp clamps to
        # exp_lo, whose 2^n is +0; expf returns 0 below -103.97), so it adds 0 to the sums.
        logits = logits.masked_fill(empty, float("-inf"))
    x = logits - logits.amax(dim=1, keepdim=True)
    n_packet = layout.n_packet
    parts = []
    if n_packet:
        parts.append(eigen_pexp(x[:, :n_packet]))
    if layout.tail:
        parts.append(glibc_expf(x[:, n_packet:]))
    e = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    total = _packet_sum(e, layout)
    for j in range(n_packet, layout.n_slots):
        total = total + e[:, j]
    return e / total[:, None]
