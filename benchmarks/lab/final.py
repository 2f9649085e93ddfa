"""Step 3.5 (main's ``final_mask``) with a full-resolution per-image colour model of the classes.

Main upsamples H bilinearly and runs the DenseCRF, whose only full-resolution evidence is
pairwise (neighbouring pixels of similar colour agree). :func:`colour_posterior` adds a unary one:
each class's colour histogram, pooled over the pixels the heat maps give it, turned into a
per-pixel posterior over Gamma; :func:`final_mask` mixes it into the upsampled H before the CRF.
"""
from __future__ import annotations

import numpy as np

from dhr_label.core.pipeline import IGNORE, guard_vanished
from dhr_label.core.resize import resize_bilinear
from dhr_label.params import DHRParams


def colour_posterior(image: np.ndarray, up: np.ndarray, init: np.ndarray, classes: np.ndarray, *, bins: int = 16,
                     src: str = "pred", support: float = 0.15, alpha: float = 1.0) -> np.ndarray:
    """Per-pixel posterior over Gamma of a colour model pooled from the image itself.

    Each pixel's RGB falls in one of ``bins ** 3`` cells. Class k's histogram counts the pixels
    it holds: ``src`` pred, the argmax of the upsampled heat maps ``up``, each pixel weighted by
    its heat; init, its M_init region where its own heat reaches ``support``. Then
    ``P(k | colour) = (h_k[b] + alpha / bins^3) / sum_j (h_j[b] + alpha / bins^3)`` with every
    histogram normalised to 1 first (classes count alike, not by size): G x H x W in [0, 1].
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
    else:
        region = init.ravel()
        for k, c in enumerate(classes.tolist()):
            sel = (region == c) & (flat[k] >= support)
            hist[k] = np.bincount(cell[sel], minlength=n)
    hist = hist / np.maximum(hist.sum(1, keepdims=True), 1e-12) + alpha / n
    post = hist / hist.sum(0, keepdims=True)
    return post[:, cell].reshape(up.shape).astype(np.float32)


def final_mask(heat: np.ndarray, classes: np.ndarray, init: np.ndarray, image: np.ndarray, params: DHRParams, crf,
               colour: float = 0.0, **options) -> np.ndarray:
    """Main's ``final_mask`` with the colour posterior mixed into the upsampled H at weight
    ``colour`` (0: main's). The guard's support stays the heat maps."""
    up = resize_bilinear(heat, init.shape)
    probs = up
    if colour > 0:
        probs = ((1 - colour) * up + colour * colour_posterior(image, up, init, classes, **options)).astype(np.float32)
    winner = np.argmax(probs, axis=0) if crf is None else np.argmax(crf.marginals(probs), axis=0)
    mask = classes[winner].astype(np.uint8)
    if params.guard > 0:
        mask = guard_vanished(mask, init, classes, params.guard, params.guard_max_share, up.__getitem__, params.guard_support)
    return mask


__all__ = ["IGNORE", "colour_posterior", "final_mask"]
