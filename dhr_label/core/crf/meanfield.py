"""DenseCRF mean-field inference (Krähenbühl & Koltun 2011) in PyTorch, batched over images.

The model is pydensecrf's as dhr-label uses it (:mod:`.pydense`): a Gaussian kernel on
position and a bilateral kernel on position and RGB, both diagonal with symmetric
normalisation and Potts compatibility, the unary ``-log(max(p, unary_clip))``. One iteration
(``DenseCRF::inference``) is

    t = -U - (-w_g) n_g K_g(n_g Q) - (-w_b) n_b K_b(n_b Q),     Q = softmax(t)

with ``K`` the permutohedral filter (:mod:`.lattice`) and ``n = 1 / sqrt(K(1) + 1e-20)``.
Every float32 operation is the one pydensecrf performs, in its order, including its softmax
(:mod:`.softmax`), so on the same unary the marginals are pydensecrf's bit for bit (what the
tests and ``benchmarks/crf_agreement.py`` check), on CPU and CUDA alike. The unary is
``log`` in float64 rounded to float32 (correctly rounded, the same on every device), where
the numpy wrapper's float32 ``log`` may differ in the last bit.

Both lattices of a batch are built once, in :class:`BatchCRF`, and serve every call and
iteration; no iteration synchronises with the host. With ``kernels="triton"`` the iterations
run as fused Triton kernels (:mod:`.fused`) on lattices laid out for them, with the same
marginals bit for bit.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ...params import CRFKernels, CRFParams
from .filtering import permutohedral_filter
from .floats import f32
from .fused import FusedLattices, resolve_kernels
from .lattice import Lattice, build_lattice
from .softmax import SlotLayout, slot_layout, softmax_slots

__all__ = ["BatchCRF", "dense_crf"]

_DEFAULT_PARAMS = CRFParams()  # frozen: safe to share as a default


def _pixel_grid(height: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and row of every pixel, row-major (pydensecrf's index ``y * W + x``), float32."""
    x = torch.arange(width, dtype=torch.float32, device=device).repeat(height)
    y = torch.arange(height, dtype=torch.float32, device=device).repeat_interleave(width)
    return x, y


def gaussian_features(height: int, width: int, sxy: float, *, device=None) -> torch.Tensor:
    """``(x / sxy, y / sxy)`` per pixel (``DenseCRF2D::addPairwiseGaussian``): [H W, 2] float32."""
    x, y = _pixel_grid(height, width, device)
    s = f32(sxy)
    return torch.stack([x / s, y / s], dim=1)


def bilateral_features(image: torch.Tensor, sxy: float, srgb: float) -> torch.Tensor:
    """``(x, y) / sxy, (r, g, b) / srgb`` per pixel, raw 0-255 colours: [H W, 5] float32.

    ``image``: [H, W, 3] uint8 (``DenseCRF2D::addPairwiseBilateral``).
    """
    height, width = image.shape[:2]
    x, y = _pixel_grid(height, width, image.device)
    s, c = f32(sxy), f32(srgb)
    rgb = image.reshape(-1, 3).to(torch.float32) / c
    return torch.cat([torch.stack([x / s, y / s], dim=1), rgb], dim=1)


def _check_image(image, index: int) -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        image = torch.as_tensor(np.asarray(image))
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"image {index}: expected H x W x 3 uint8, found {tuple(image.shape)} {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image {index}: expected at least one pixel, found {tuple(image.shape)}")
    return image


class BatchCRF:
    """The DenseCRFs of a batch of images, lattices built once, any number of calls.

    Parameters
    ----------
    images : sequence of Tensor or ndarray, each (H_b, W_b, 3) uint8
        Any mix of sizes.
    params : CRFParams, optional
    device : torch.device or str, optional
        Where to build and compute; default: the device of the first image (CPU for arrays).
    method : {"segments", "bags"}, optional
        The filter implementation (:mod:`.filtering`); default by device. Same result.
    kernels : CRFKernels or str, optional
        ``eager`` (torch operations), ``triton`` (fused kernels, :mod:`.fused`) or ``auto``
        (triton on CUDA when Triton imports); default ``params.kernels``. Same result.

    Examples
    --------
    >>> import torch
    >>> images = [torch.zeros(4, 5, 3, dtype=torch.uint8), torch.full((3, 2, 3), 9, dtype=torch.uint8)]
    >>> crf = BatchCRF(images)
    >>> q = crf.marginals([torch.full((2, 4, 5), 0.5), torch.rand(3, 3, 2)])
    >>> [tuple(m.shape) for m in q]
    [(2, 4, 5), (3, 3, 2)]
    """

    def __init__(
        self, images: Sequence, params: CRFParams = _DEFAULT_PARAMS, *, device=None, method: str | None = None, kernels=None
    ):
        if len(images) == 0:
            raise ValueError("expected at least one image, found an empty batch")
        checked = [_check_image(image, b) for b, image in enumerate(images)]
        self.device = torch.device(device) if device is not None else checked[0].device
        self.params, self.method = params, method
        self.sizes = [(int(im.shape[0]), int(im.shape[1])) for im in checked]
        counts = [h * w for h, w in self.sizes]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
        self.n_pixels = self.starts[-1]
        image_index = torch.repeat_interleave(
            torch.arange(len(checked), device=self.device), torch.tensor(counts, device=self.device)
        )
        pixels = [im.to(self.device) for im in checked]
        self.kernels = resolve_kernels(params.kernels if kernels is None else kernels, self.device)
        self.weights = (-f32(params.gauss_compat), -f32(params.bilateral_compat))  # Potts: -w
        if self.kernels is CRFKernels.triton:
            self.fused, self.lattices, self.norms = FusedLattices(pixels, params), None, None
            return
        self.fused = None
        gauss = torch.cat([gaussian_features(h, w, params.gauss_sxy, device=self.device) for h, w in self.sizes])
        bilat = torch.cat([bilateral_features(im, params.bilateral_sxy, params.bilateral_srgb) for im in pixels])
        #: Gaussian (d = 2) and bilateral (d = 5) lattices, Gaussian first as pydensecrf adds it.
        self.lattices: tuple[Lattice, Lattice] = (build_lattice(gauss, image_index), build_lattice(bilat, image_index))
        self.norms = tuple(_normalisation(lattice, method) for lattice in self.lattices)

    def __len__(self) -> int:
        return len(self.sizes)

    def marginals(self, probs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Mean-field marginals Q for per-image channel values ``probs``.

        Parameters
        ----------
        probs : sequence of Tensor, each (C_b, H_b, W_b), floating
            One per image, in the batch's order; C_b >= 1 may differ between images. The
            unary is ``-log(max(p, unary_clip))`` of the values as given.

        Returns
        -------
        list of Tensor, each (C_b, H_b, W_b) float32, on the batch's device
            Each pixel's Q sums to 1 over its image's C_b labels. With ``iterations = 0``
            it is ``softmax(-U)``.
        """
        unaries = self._unaries(probs)
        counts = [u.shape[0] for u in unaries]
        layout = slot_layout(counts)
        neg_unary, empty = self._to_slots(unaries, layout)
        del unaries  # copied into the slots: free them before the iterations
        # pydensecrf's filter takes its 1-2 channel path (alpha applied last) for C <= 2.
        small = [c <= 2 for c in counts]
        if self.fused is not None:
            if empty is not None:  # -inf: no part in the maximum, exp exactly 0 (softmax_slots)
                neg_unary.masked_fill_(empty, float("-inf"))
            q = self.fused.mean_field(neg_unary, layout, small, self.params.iterations)
            return self._from_slots(q, layout, counts)
        alpha_last = small[0] if len(set(small)) == 1 else self._per_pixel(small)
        q = mean_field(
            neg_unary, self.lattices, self.norms, self.weights, layout, empty, alpha_last,
            self.params.iterations, method=self.method,
        )
        return self._from_slots(q, layout, counts)

    def labels(self, probs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per image, the index of the winning channel per pixel: (H_b, W_b) int64."""
        return [torch.argmax(q, dim=0) for q in self.marginals(probs)]

    # ----------------------------------------------------------------------------------------
    def _unaries(self, probs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``-log(max(p, clip))`` per image, [C_b, H_b W_b] float32, validated."""
        if len(probs) != len(self.sizes):
            raise ValueError(f"expected channel values for {len(self.sizes)} images, found {len(probs)}")
        clip = f32(self.params.unary_clip)
        out = []
        for b, (p, (h, w)) in enumerate(zip(probs, self.sizes)):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"probs[{b}]: expected a torch.Tensor, found {type(p).__name__}")
            if p.ndim != 3 or tuple(p.shape[1:]) != (h, w) or p.shape[0] < 1:
                raise ValueError(
                    f"probs[{b}]: expected C x {h} x {w} with C >= 1 (image {b} is {h} x {w}), found {tuple(p.shape)}"
                )
            if not p.is_floating_point():
                raise ValueError(f"probs[{b}]: expected a floating dtype, found {p.dtype}")
            p = p.to(device=self.device, dtype=torch.float32).reshape(p.shape[0], h * w)
            # float32 clip as the wrapper; log in float64, rounded once: the same on any device.
            out.append(-torch.log(torch.clamp_min(p, clip).double()).to(torch.float32))
        return out

    def _per_pixel(self, flags: list[bool]) -> torch.Tensor:
        """A per-image flag repeated over the image's pixels: [P] bool."""
        counts = torch.tensor([h * w for h, w in self.sizes], device=self.device)
        return torch.repeat_interleave(torch.tensor(flags, device=self.device), counts, output_size=self.n_pixels)

    def _to_slots(self, unaries: list[torch.Tensor], layout: SlotLayout) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``-U`` of all images in slot layout [P, S], and the mask of empty slots (or None)."""
        neg = torch.zeros(self.n_pixels, layout.n_slots, dtype=torch.float32, device=self.device)
        empty = None if layout.dense else torch.ones(self.n_pixels, layout.n_slots, dtype=torch.bool, device=self.device)
        for b, (u, slots) in enumerate(zip(unaries, layout.slots)):
            rows = slice(self.starts[b], self.starts[b + 1])
            index = torch.tensor(slots, device=self.device)
            neg[rows, index] = -u.T
            if empty is not None:
                empty[rows, index] = False
        return neg, empty

    def _from_slots(self, q: torch.Tensor, layout: SlotLayout, counts: list[int]) -> list[torch.Tensor]:
        out = []
        for b, (slots, (h, w)) in enumerate(zip(layout.slots, self.sizes)):
            rows = q[self.starts[b] : self.starts[b + 1]]
            index = torch.tensor(slots, device=self.device)
            out.append(rows.index_select(1, index).T.reshape(counts[b], h, w).contiguous())
        return out


def _normalisation(lattice: Lattice, method: str | None = None) -> torch.Tensor:
    """``1 / sqrt(K(1) + 1e-20)`` per pixel, as pydensecrf: K(1) by its 1-channel path,
    then in double (``1.0 / sqrt(norm + 1e-20)``), stored as float32. [P] float32."""
    ones = torch.ones(lattice.n_pixels, 1, dtype=torch.float32, device=lattice.device)
    k1 = permutohedral_filter(lattice, ones, alpha_last=True, method=method)[:, 0]
    return (1.0 / torch.sqrt(k1.double() + 1e-20)).to(torch.float32)


def mean_field(
    neg_unary: torch.Tensor,
    lattices: Sequence[Lattice],
    norms: Sequence[torch.Tensor],
    weights: Sequence[float],
    layout: SlotLayout,
    empty: torch.Tensor | None,
    alpha_last: bool | torch.Tensor,
    iterations: int,
    *,
    method: str | None = None,
) -> torch.Tensor:
    """Mean-field iterations in slot layout (``DenseCRF::inference``).

    Parameters
    ----------
    neg_unary : Tensor, shape (P, S), float32
        ``-U`` per pixel and slot.
    lattices, norms, weights : one per pairwise term, in pydensecrf's order
        The built lattice, ``n`` ([P] float32) and the Potts factor ``-w``.
    layout, empty : the slot layout and its empty-slot mask (see :mod:`.softmax`)
    alpha_last : bool or Tensor (P,) bool
        Per pixel, pydensecrf's filter path (see :meth:`.Lattice.filter`).
    iterations : int
    method : str, optional
        Filter implementation (:mod:`.filtering`).

    Returns
    -------
    Tensor, shape (P, S), float32
        Q; 0 in empty slots.
    """
    q = softmax_slots(neg_unary, layout, empty)
    workspaces = [{} for _ in lattices]  # filter scratch, reused by every iteration
    for _ in range(iterations):
        t = neg_unary
        for lattice, norm, weight, space in zip(lattices, norms, weights, workspaces):
            n = norm[:, None]
            message = permutohedral_filter(lattice, q * n, alpha_last=alpha_last, method=method, workspace=space) * n  # n K(n Q)
            t = t - message * weight  # Potts: out = -w * out; tmp1 -= out
        q = softmax_slots(t, layout, empty)
    return q


def dense_crf(images: torch.Tensor, probs: torch.Tensor, params: CRFParams = _DEFAULT_PARAMS) -> torch.Tensor:
    """DenseCRF marginals of a batch of same-size images: a drop-in CRF post-processing step.

    The CRF of IRN / CLIP-ES / ToCo-style pipelines (``pydensecrf`` with a Gaussian and a
    bilateral kernel, ``-log(p)`` unaries), computed on the inputs' device, batched.

    Parameters
    ----------
    images : Tensor, shape (B, H, W, 3), uint8
    probs : Tensor, shape (B, C, H, W), floating
        Per-pixel class scores or probabilities; the unary is ``-log(max(p, unary_clip))``.
    params : CRFParams, optional
        Kernel widths, weights, iterations (default: DHR's, 10 iterations).

    Returns
    -------
    Tensor, shape (B, C, H, W), float32, on the device of ``probs``

    Examples
    --------
    >>> import torch
    >>> images = torch.randint(0, 256, (2, 6, 8, 3), dtype=torch.uint8)
    >>> probs = torch.softmax(torch.randn(2, 3, 6, 8), dim=1)
    >>> q = dense_crf(images, probs)
    >>> q.shape, bool(torch.allclose(q.sum(dim=1), torch.ones(2, 6, 8), atol=1e-5))
    (torch.Size([2, 3, 6, 8]), True)
    """
    if not isinstance(images, torch.Tensor) or not isinstance(probs, torch.Tensor):
        raise TypeError(f"expected torch tensors, found {type(images).__name__} and {type(probs).__name__}")
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != torch.uint8:
        raise ValueError(f"images: expected B x H x W x 3 uint8, found {tuple(images.shape)} {images.dtype}")
    if probs.ndim != 4 or probs.shape[0] != images.shape[0] or probs.shape[2:] != images.shape[1:3]:
        raise ValueError(
            f"probs: expected {images.shape[0]} x C x {images.shape[1]} x {images.shape[2]} (the images'), "
            f"found {tuple(probs.shape)}"
        )
    if images.device != probs.device:
        raise ValueError(f"images and probs must be on one device, found {images.device} and {probs.device}")
    crf = BatchCRF(list(images), params, device=probs.device)
    return torch.stack(crf.marginals(list(probs)))
