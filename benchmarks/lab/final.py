"""Step 3.5 with a full-resolution per-image colour model of the classes (``f.colour``).

The package's FINAL_MASK upsamples H bilinearly and runs the DenseCRF, whose only
full-resolution evidence is pairwise (neighbouring pixels of similar colour agree).
:func:`colour_posterior` adds a unary one: each class's colour histogram, pooled over the pixels
the heat maps give it, turned into a per-pixel posterior over Gamma. :class:`ColourCRFs` mixes
it into the upsampled H on its way into the CRF, so the package's ``final_mask`` itself runs
(the guard still reads the unmixed H).
"""
from __future__ import annotations

import numpy as np
import torch

from dhr_label.core.tensors import to_host


def colour_posterior(image: np.ndarray, up: np.ndarray, init: np.ndarray, classes: np.ndarray, *, bins: int = 16,
                     src: str = "pred", support: float = 0.15, alpha: float = 1.0) -> np.ndarray:
    """Per-pixel posterior over Gamma of a colour model pooled from the image itself.

    Parameters
    ----------
    image : ndarray, shape (H, W, 3), uint8
    up : ndarray, shape (G, H, W)
        The upsampled heat maps.
    init : ndarray, shape (H, W), uint8
        M_init.
    classes : ndarray, shape (G,)
        Gamma.
    bins : int
        Each pixel's RGB falls in one of ``bins ** 3`` cells.
    src : {"pred", "init"}
        Which pixels class k's histogram counts: pred, the argmax of ``up``, each weighted by its
        heat; init, its M_init region where its own heat reaches ``support``.
    support : float
    alpha : float
        Additive smoothing, spread over the cells.

    Returns
    -------
    ndarray, shape (G, H, W), float32 in [0, 1]
        ``P(k | colour) = (h_k[b] + alpha / bins^3) / sum_j (h_j[b] + alpha / bins^3)``, every
        histogram normalised to 1 first (classes count alike, not by size).
    """
    g = len(classes)
    q = (image.astype(np.int64) * bins) // 256
    cell = ((q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]).ravel()
    n = bins**3
    hist = np.zeros((g, n))
    flat = up.reshape(g, -1)
    if src == "pred":
        win = np.argmax(flat, axis=0)
        for k in range(g):
            sel = win == k
            hist[k] = np.bincount(cell[sel], weights=flat[k, sel], minlength=n)
    elif src == "init":
        region = init.ravel()
        for k, c in enumerate(classes.tolist()):
            sel = (region == c) & (flat[k] >= support)
            hist[k] = np.bincount(cell[sel], minlength=n)
    else:
        raise SystemExit(f"f.src must be pred or init, got {src!r}")
    hist = hist / np.maximum(hist.sum(1, keepdims=True), 1e-12) + alpha / n
    post = hist / hist.sum(0, keepdims=True)
    return post[:, cell].reshape(up.shape).astype(np.float32)


class ColourCRFs:
    """The images' DenseCRFs (``ImageCRFs``) with the colour posterior mixed into their unary.

    ``marginals(ups)``: each upsampled H becomes ``(1 - colour) * up + colour * P(k | colour)``
    before the CRF; without a CRF (``crfs`` None: ``--no-crf``) the mixed maps themselves are
    returned, and the package's ``final_mask`` takes their argmax.

    Parameters
    ----------
    crfs : ImageCRFs or None
    states : list of ImageState
        The batch ``final_mask`` runs, in its order.
    colour : float in [0, 1]
    **options
        Of :func:`colour_posterior` (``bins``, ``src``, ``support``, ``alpha``).
    """

    def __init__(self, crfs, states, colour: float, **options):
        self.crfs, self.states, self.colour, self.options = crfs, states, colour, options

    def marginals(self, probs: list) -> list:
        mixed = []
        for s, up in zip(self.states, probs):
            post = colour_posterior(to_host(s.image), to_host(up), to_host(s.init), s.classes, **self.options)
            mixed.append(((1.0 - self.colour) * up + self.colour * torch.from_numpy(post)).to(torch.float32))
        return mixed if self.crfs is None else self.crfs.marginals(mixed)
