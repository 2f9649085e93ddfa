"""DenseCRF R_C (Krähenbühl & Koltun 2011) as DHR uses it, with two backends.

``pydensecrf`` (:mod:`.pydense`) wraps Krähenbühl's C++ (CPU, one image at a time); ``torch``
(:mod:`.meanfield`, :mod:`.lattice`) is ours, the same model on the permutohedral lattice in
PyTorch, batched over images, on any device. :func:`image_crfs` gives the CRFs of a batch of
images for the chosen backend behind one interface (:class:`ImageCRFs`); both keep the images'
lattices for every later call (DHR's two passes).
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from ...params import CRFBackend, CRFParams


class ImageCRFs(Protocol):
    """The DenseCRFs of a batch of images (tensors on one device), reusable for several calls."""

    def marginals(self, probs: list) -> list:
        """Per image, the marginals Q (C_b x H_b x W_b float32) for ``probs`` of that shape
        (float32 tensors on the images' device; the unary is ``-log(max(p, unary_clip))``)."""


def image_crfs(images: list, params: CRFParams, device) -> ImageCRFs:
    """The CRFs of ``images`` (H x W x 3 uint8 each, numpy or tensors) on ``device``.

    ``torch``: one batched lattice per kernel for the whole batch (:class:`.meanfield.BatchCRF`).
    ``pydensecrf``: one pydensecrf model per image on the host (CPU tensors only).
    """
    if params.backend is CRFBackend.torch:
        from .meanfield import BatchCRF

        return BatchCRF(images, params, device=device)
    return PydenseCRFs(images, params)


class PydenseCRFs:
    """pydensecrf for each image of a batch, on the host, behind :class:`ImageCRFs`."""

    def __init__(self, images: list, params: CRFParams):
        from .pydense import PydenseCRF

        self._crfs = [PydenseCRF(_host(image), params) for image in images]

    def marginals(self, probs: list) -> list:
        import torch

        return [torch.from_numpy(crf.marginals(_host(p))).to(p.device) for crf, p in zip(self._crfs, probs)]


def _host(array) -> np.ndarray:
    return array.detach().cpu().numpy() if hasattr(array, "detach") else np.asarray(array)


__all__ = ["ImageCRFs", "PydenseCRFs", "image_crfs"]
