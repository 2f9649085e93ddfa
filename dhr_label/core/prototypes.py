"""Dataset-level class prototypes for Steps 2-3 (ours, not in the paper; docs/algorithm.md).

Step 2's CAP centroid of a class is the mean feature of the class's region in M_init. For a
minor class that region is often a coarse seed blob two or three times the object, or a base
mask region spilling over the background, so the centroid is mostly the surrounding class and
the heat map peaks on the neighbour. Centroids pooled over the ground-truth regions instead (an
oracle) lift CamVid val from 40 to 57 mIoU with the same heat maps (docs/algorithm.md). A
prototype, the class's mean feature over every image of the dataset, averages the changing
surroundings away while the class itself adds up; blending it into every image's centroid
gives Steps 2-3 purer centroids without any label.

Pooling is a map/reduce over images: :func:`image_sums` per image (pure), :func:`add_sums` in a
fixed order, then :func:`finish`. Features are L2-normalised per cell before pooling, so every
cell counts alike whatever its feature norm. The blend itself is :func:`~.cap.blend_centroids`
in Steps 2-3. The sums use the stages' own CAP weights and resize (torch, float64), and are
returned on the host: pooling is added up there in a fixed order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .cap import cell_fractions
from .resize import resize_adjoint, resized_norms
from .tensors import WORK, to_device, to_host

Sums = list[tuple[np.ndarray, np.ndarray]]  # per source: (C x D feature sums, C masses), float64


@dataclass(frozen=True)
class Prototypes:
    """One ``(C, D)`` float32 array per feature source, row c for class id c.

    ``uss``: the USS features; ``wss``: one array per WSS layer, pooled on the USS grid (where
    Step 3.2 uses the layers). A zero row: no image had a pixel of that class.
    """

    uss: np.ndarray
    wss: tuple[np.ndarray, ...] = ()

    def __post_init__(self) -> None:
        arrays = (self.uss, *self.wss)
        if any(a.ndim != 2 for a in arrays) or len({a.shape[0] for a in arrays}) != 1:
            raise ValueError(f"prototypes must be (C, D) arrays with one C, got shapes {[a.shape for a in arrays]}")

    @property
    def num_classes(self) -> int:
        return self.uss.shape[0]


def image_sums(mask, uss, wss: list | None, num_classes: int) -> Sums:
    """The map step for one image: per feature source, the soft-CAP-weighted sums of the
    L2-normalised cell features of every class of ``mask``, and the weights' mass.

    Parameters
    ----------
    mask : ndarray or tensor, shape (H, W), uint8
        The class regions to pool (255 = ignore); refine uses the base mask.
    uss : ndarray or tensor, shape (D_us, h, w)
    wss : list of ndarray or tensor, each (D_l, h_l, w_l), optional
        Resized to the USS grid first, as Step 3.2 does.
    num_classes : int
        C: row c of every result is class id c.

    Returns
    -------
    list of (sums (C, D) float64, mass (C,) float64): USS first, then each WSS layer.

    Examples
    --------
    >>> uss = np.array([[[3.0, 0.0]], [[4.0, 2.0]]])     # D = 2 on a 1 x 2 grid: cells (3, 4), (0, 2)
    >>> [(s.round(3).tolist(), m.tolist()) for s, m in image_sums(np.array([[0, 1]], np.uint8), uss, None, 2)]
    [([[0.6, 0.8], [0.0, 1.0]], [1.0, 1.0])]
    """
    device = uss.device if isinstance(uss, torch.Tensor) else "cpu"
    grid = tuple(uss.shape[1:])
    weights = cell_fractions([to_device(mask, device)], [np.arange(num_classes)], [grid], mode="soft")[0]
    weights = weights.reshape(1, num_classes, *grid)
    out = []
    for source in [uss] + list(wss or []):
        features = to_device(source, device, WORK)[None]
        # Sum over the cells of the source resized to the USS grid, each cell L2-normalised:
        # its weight divided by its norm, taken back to the source's own grid (resize_adjoint).
        scaled = weights / resized_norms(features, grid)[:, None].clamp(min=1e-8)
        sums = resize_adjoint(scaled, features.shape[-2:]).flatten(2) @ features.flatten(2).mT
        out.append((to_host(sums[0]), to_host(weights[0].sum(dim=(1, 2)))))
    return out


def add_sums(left: Sums | None, right: Sums | None) -> Sums | None:
    """Two images' (or chunks') :func:`image_sums` added, source by source."""
    if left is None or right is None:
        return right if left is None else left
    if len(left) != len(right) or any(a.shape != b.shape for (a, _), (b, _) in zip(left, right)):
        raise ValueError(
            f"every image must have the same feature sources: {[a.shape for a, _ in left]} vs {[b.shape for b, _ in right]}"
        )
    return [(a + b, m + n) for (a, m), (b, n) in zip(left, right)]


def finish(sums: Sums) -> Prototypes:
    """The reduce step: the summed :func:`image_sums` divided by their mass."""
    means = [(s / np.maximum(m, 1e-12)[:, None]).astype(np.float32) for s, m in sums]
    return Prototypes(uss=means[0], wss=tuple(means[1:]))


__all__ = ["Prototypes", "add_sums", "finish", "image_sums"]
