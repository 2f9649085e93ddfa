"""The standardised PCA, fitted in a stream, against a direct SVD; L2 normalisation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dhr_label.features.pca import PCAFit, l2_normalise, project

TOL = 1e-6


def _maps(seed=0):
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(3, 12))  # 12 channels, rank-3 signal plus noise, channels of unequal scale
    return [(rng.normal(size=(40, 3)) @ basis + 0.01 * rng.normal(size=(40, 12))).T.reshape(12, 5, 8)
            * np.linspace(1, 50, 12)[:, None, None] + 7 for _ in range(4)]


def _fitted(maps, dims):
    fit = PCAFit()
    for m in maps:
        fit.add(m)
    return fit.fit(dims)


def test_streamed_fit_equals_svd_of_the_standardised_cells():
    maps = _maps()
    projection = _fitted(maps, 3)
    cells = np.concatenate([m.reshape(12, -1).T for m in maps])
    z = (cells - cells.mean(0)) / cells.std(0)
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    for found, expected in zip(projection.components, vt[:3]):
        assert abs(abs(found @ expected) - 1) < 1e-5  # the same axis, up to its sign
        assert found[np.abs(found).argmax()] > 0  # the sign convention
    assert np.allclose(projection.explained, s[:3] ** 2 / (s ** 2).sum(), atol=1e-6)
    assert projection.cells == 160 and projection.images == 4


def test_projection_numpy_and_torch_agree_and_center_the_sample():
    maps = _maps()
    projection = _fitted(maps, 2)
    y = np.concatenate([project(m.astype(np.float32), projection).reshape(2, -1) for m in maps], axis=1)
    assert np.allclose(y.mean(axis=1), 0, atol=1e-3)
    t = project(torch.from_numpy(maps[0].astype(np.float32)), projection).numpy()
    assert np.allclose(t, project(maps[0].astype(np.float32), projection), atol=1e-4)


def test_fit_refuses_too_few_cells_or_too_many_dims():
    fit = PCAFit()
    fit.add(np.ones((4, 1, 2)))
    with pytest.raises(ValueError, match="needs more than 2 cells"):
        fit.fit(2)
    with pytest.raises(ValueError, match="expected 4 channels"):
        fit.add(np.ones((5, 1, 2)))


def test_l2_normalise_keeps_zero_cells():
    x = np.array([[[3.0, 0.0]], [[4.0, 0.0]]])
    assert np.allclose(l2_normalise(x), [[[0.6, 0.0]], [[0.8, 0.0]]], atol=TOL)
    assert torch.allclose(l2_normalise(torch.from_numpy(x)), torch.tensor([[[0.6, 0.0]], [[0.8, 0.0]]], dtype=torch.float64))
