"""DenseCRF R_C (Krähenbühl & Koltun 2011) as DHR uses it, with two backends.

``pydensecrf`` (:mod:`.pydense`) wraps Krähenbühl's C++; ``torch`` (:mod:`.meanfield`,
:mod:`.lattice`) is ours, the same model on the permutohedral lattice in PyTorch, batched over
images, on any device. :func:`image_crf` gives the CRF of one image for the chosen backend;
both keep the image's lattice for every later call (DHR's two passes).
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from ...params import CRFBackend, CRFParams


class ImageCRF(Protocol):
    """The DenseCRF of one image, reusable for several label maps."""

    height: int
    width: int

    def marginals(self, probs: np.ndarray) -> np.ndarray:
        """Mean-field marginals Q (C x H x W float32) for channel values ``probs`` (C x H x W)."""

    def labels(self, probs: np.ndarray) -> np.ndarray:
        """Index of the winning channel per pixel, H x W int64."""


def image_crf(image: np.ndarray, params: CRFParams) -> ImageCRF:
    """The CRF of ``image`` (H x W x 3 uint8) with ``params.backend``."""
    if params.backend is CRFBackend.torch:
        from .torch_image import TorchImageCRF

        return TorchImageCRF(image, params)
    from .pydense import PydenseCRF

    return PydenseCRF(image, params)


class BatchCRF(Protocol):
    """The DenseCRFs of a batch of images (tensors on one device), reusable for several calls."""

    def marginals(self, probs: list) -> list:
        """Per image, the marginals Q (C_b x H_b x W_b float32) for ``probs`` of that shape."""


def batch_crf(images: list, params: CRFParams, device) -> BatchCRF:
    """The CRFs of ``images`` (H x W x 3 uint8 each, numpy or tensors) on ``device``.

    ``torch``: one batched lattice per kernel for the whole batch (:mod:`.meanfield`).
    ``pydensecrf``: one pydensecrf model per image on the host (CPU tensors only); the batched
    executor then computes the same masks as the one-image executor, which the tests use.
    """
    if params.backend is CRFBackend.torch:
        from .meanfield import BatchCRF as TorchBatchCRF

        return TorchBatchCRF(images, params, device=device)
    return _PerImage(images, params)


class _PerImage:
    """pydensecrf for each image of a batch, on the host."""

    def __init__(self, images: list, params: CRFParams):
        from .pydense import PydenseCRF

        self._crfs = [PydenseCRF(_host(image), params) for image in images]

    def marginals(self, probs: list) -> list:
        import torch

        return [torch.as_tensor(crf.marginals(_host(p)), device=p.device) for crf, p in zip(self._crfs, probs)]


def _host(array) -> np.ndarray:
    return array.cpu().numpy() if hasattr(array, "cpu") else np.asarray(array)


__all__ = ["BatchCRF", "ImageCRF", "batch_crf", "image_crf"]
