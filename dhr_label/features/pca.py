"""PCA of feature cells, fitted without labels, and L2 normalisation per cell.

The projection is fitted on the standardised channels (each channel centred and divided by its
standard deviation over the sample: the PCA of the correlation matrix), the recipe whose
features agree with the benchmark USS features of our real data (README, Results, "USS features
made by dhr-label features"). Sums are accumulated in float64 one image at a time, so the fit
needs memory for one ``D x D`` matrix whatever the sample size, and does not depend on how the
images were batched.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: A channel whose standard deviation over the sample is below this is left unscaled (constant).
MIN_STD = 1e-6
#: Cells whose L2 norm is below this stay zero instead of being divided.
MIN_NORM = 1e-12


@dataclass(frozen=True)
class Projection:
    """``y = components @ ((x - mean) / scale)`` per cell.

    Attributes
    ----------
    mean, scale : ndarray [D] float32
        Per-channel mean and standard deviation of the sample.
    components : ndarray [N, D] float32
        Unit principal axes, largest variance first, each signed so that its entry of largest
        magnitude is positive (a deterministic choice of sign).
    explained : ndarray [N] float64
        Share of the standardised variance each axis explains.
    cells, images : int
        How many feature cells and images the fit saw.
    """

    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray
    explained: np.ndarray
    cells: int
    images: int

    @property
    def dims(self) -> tuple[int, int]:
        """``(N, D)``: output and input dimensions."""
        return self.components.shape


class PCAFit:
    """Streaming sums for a PCA: :meth:`add` each sample image's ``[D, h, w]`` map, then :meth:`fit`."""

    def __init__(self):
        self.count = 0
        self.images = 0
        self._sum: np.ndarray | None = None
        self._outer: np.ndarray | None = None

    def add(self, features: np.ndarray) -> None:
        """Add every cell of one ``[D, h, w]`` feature map to the sums."""
        cells = np.asarray(features, dtype=np.float64).reshape(features.shape[0], -1)
        if self._sum is None:
            self._sum = np.zeros(cells.shape[0])
            self._outer = np.zeros((cells.shape[0], cells.shape[0]))
        elif cells.shape[0] != self._sum.shape[0]:
            raise ValueError(f"expected {self._sum.shape[0]} channels, found {cells.shape[0]}")
        self._sum += cells.sum(axis=1)
        self._outer += cells @ cells.T
        self.count += cells.shape[1]
        self.images += 1

    def fit(self, dims: int) -> Projection:
        """The projection to the ``dims`` leading axes of the standardised channels.

        Raises
        ------
        ValueError
            ``dims`` exceeds the channels, or fewer cells than ``dims + 1`` were added.
        """
        if self._sum is None or self.count <= dims:
            raise ValueError(f"a PCA to {dims} dimensions needs more than {dims} cells, the sample has {self.count}")
        channels = self._sum.shape[0]
        if not 1 <= dims <= channels:
            raise ValueError(f"--pca {dims}: the features have {channels} channels")
        mean = self._sum / self.count
        covariance = self._outer / self.count - np.outer(mean, mean)
        std = np.sqrt(np.clip(np.diag(covariance), 0, None))
        scale = np.where(std > MIN_STD, std, 1.0)
        correlation = covariance / np.outer(scale, scale)
        values, vectors = np.linalg.eigh(correlation)
        order = np.argsort(values)[::-1][:dims]
        axes = vectors[:, order].T
        signs = np.sign(axes[np.arange(dims), np.abs(axes).argmax(axis=1)])
        axes *= signs[:, None]
        total = max(float(np.clip(values, 0, None).sum()), MIN_NORM)
        return Projection(
            mean=mean.astype(np.float32), scale=scale.astype(np.float32), components=axes.astype(np.float32),
            explained=np.clip(values[order], 0, None) / total, cells=self.count, images=self.images,
        )


def project(features, projection: Projection):
    """``[D, h, w]`` (numpy or torch) -> ``[N, h, w]`` of the same type, float32."""
    n, d = projection.dims
    if features.shape[0] != d:
        raise ValueError(f"the PCA projects {d} channels, the features have {features.shape[0]}")
    if isinstance(features, np.ndarray):
        cells = (features.reshape(d, -1).astype(np.float32) - projection.mean[:, None]) / projection.scale[:, None]
        return (projection.components @ cells).reshape(n, *features.shape[1:])
    import torch

    as_tensor = lambda a: torch.as_tensor(a, device=features.device)  # noqa: E731
    cells = (features.reshape(d, -1).float() - as_tensor(projection.mean)[:, None]) / as_tensor(projection.scale)[:, None]
    return (as_tensor(projection.components) @ cells).reshape(n, *features.shape[1:])


def l2_normalise(features):
    """Each cell of ``[D, h, w]`` (numpy or torch) divided by its L2 norm; zero cells stay zero."""
    if isinstance(features, np.ndarray):
        norms = np.linalg.norm(features, axis=0, keepdims=True)
        return features / np.where(norms > MIN_NORM, norms, 1.0)
    norms = features.norm(dim=0, keepdim=True)
    return features / norms.clamp_min(MIN_NORM)
