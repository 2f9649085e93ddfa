"""The torch DenseCRF for one image with numpy in and out, as the one-image executor uses it."""
from __future__ import annotations

import numpy as np
import torch

from ...params import CRFParams
from .meanfield import BatchCRF


class TorchImageCRF:
    """:class:`~.meanfield.BatchCRF` of one image on the CPU, behind the numpy interface of
    :class:`~dhr_label.core.crf.ImageCRF` (its lattices are kept for every later call)."""

    def __init__(self, image: np.ndarray, params: CRFParams):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be H x W x 3 uint8, got {image.dtype} {image.shape}")
        self.height, self.width = image.shape[:2]
        self._crf = BatchCRF([torch.from_numpy(np.ascontiguousarray(image))], params, device="cpu")

    def marginals(self, probs: np.ndarray) -> np.ndarray:
        if probs.shape[1:] != (self.height, self.width):
            raise ValueError(f"probs are {probs.shape[1]} x {probs.shape[2]}, the image is {self.height} x {self.width}")
        q = self._crf.marginals([torch.from_numpy(np.ascontiguousarray(probs, dtype=np.float32))])[0]
        return q.numpy()

    def labels(self, probs: np.ndarray) -> np.ndarray:
        return np.argmax(self.marginals(probs), axis=0)
