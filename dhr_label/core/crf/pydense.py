"""The one wrapper around pydensecrf: DenseCRF R_C with its pairwise set-up reusable."""
from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf

from ...params import CRFParams


class PydenseCRF:
    """DenseCRF of one image, for one or more label maps.

    The pairwise kernels depend only on the image and the CRF parameters, so the lattice
    built for a label count is kept and reused for the next call with the same count (DHR's
    two passes over one image often have the same count): the output is identical and the
    set-up is paid once (docs/performance.md).

    Parameters
    ----------
    image : ndarray, shape (H, W, 3), uint8
    params : CRFParams
    """

    def __init__(self, image: np.ndarray, params: CRFParams):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be H x W x 3 uint8, got {image.dtype} {image.shape}")
        self.image = np.require(image, requirements=["C", "W"])  # pydensecrf refuses read-only
        self.height, self.width = image.shape[:2]
        self.params = params
        self._models: dict[int, dcrf.DenseCRF2D] = {}

    def _model(self, n_labels: int) -> dcrf.DenseCRF2D:
        model = self._models.get(n_labels)
        if model is None:
            p = self.params
            model = dcrf.DenseCRF2D(self.width, self.height, n_labels)  # width first
            model.addPairwiseGaussian(sxy=p.gauss_sxy, compat=p.gauss_compat)
            model.addPairwiseBilateral(
                sxy=p.bilateral_sxy, srgb=p.bilateral_srgb, rgbim=self.image, compat=p.bilateral_compat
            )
            self._models = {n_labels: model}  # keep one lattice: the last label count
        return model

    def marginals(self, probs: np.ndarray) -> np.ndarray:
        """Mean-field marginals Q (C x H x W float32) for channel values ``probs`` (C x H x W).

        The unary is ``-log(clip(probs, unary_clip))`` of the values as given.
        """
        n_labels, height, width = probs.shape
        if (height, width) != (self.height, self.width):
            raise ValueError(
                f"probs are {height} x {width}, the image is {self.height} x {self.width}"
            )
        unary = -np.log(np.maximum(probs, self.params.unary_clip, dtype=np.float32))
        unary = np.ascontiguousarray(unary.reshape(n_labels, -1), dtype=np.float32)
        if self.params.iterations == 0:
            return _softmax(-unary).reshape(n_labels, height, width)
        model = self._model(n_labels)
        model.setUnaryEnergy(unary)
        q = model.inference(self.params.iterations)
        return np.asarray(q, dtype=np.float32).reshape(n_labels, height, width)

    def labels(self, probs: np.ndarray) -> np.ndarray:
        """Index of the winning channel per pixel, H x W int64."""
        return np.argmax(self.marginals(probs), axis=0)


def _softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(axis=0, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=0, keepdims=True)
