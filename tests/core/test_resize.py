"""Resampling: bilinear resize (align_corners=False), its adjoint, and the norms of resized cells
computed without resizing — torch's F.interpolate is the independent reference."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dhr_label.core.resize import cell_index, resize, resize_adjoint, resized_norms

ATOL = 1e-12  # float64 on both sides

SIZES = [
    ((4, 5), (8, 10)),  # 2x up
    ((6, 8), (24, 32)),  # 4x up (feature grid -> image)
    ((8, 10), (4, 5)),  # 2x down
    ((9, 7), (4, 3)),  # down by a non-integer factor
    ((7, 9), (3, 13)),  # down in one axis, up in the other
    ((1, 1), (4, 6)),  # 1 x 1 up
    ((5, 6), (1, 1)),  # down to 1 x 1
    ((1, 5), (3, 5)),  # one axis unchanged
    ((23, 30), (45, 60)),  # a WSS layer on the USS grid of the CamVid benchmark
]


def _interpolate(maps: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(maps.reshape(1, -1, *maps.shape[-2:]), size=size, mode="bilinear", align_corners=False).reshape(
        *maps.shape[:-2], *size)


@pytest.mark.parametrize("grid, size", SIZES)
def test_resize_is_torch_interpolate(grid, size):
    maps = torch.as_tensor(np.random.default_rng(sum(grid) + sum(size)).uniform(0, 1, (2, 3, *grid)))
    out = resize(maps, size)
    assert out.shape == (2, 3, *size) and out.dtype == torch.float64
    torch.testing.assert_close(out, _interpolate(maps, size), atol=ATOL, rtol=0)


def test_hand_computed_row():
    # 1 x 2 -> 1 x 4: source x = (i + 0.5) / 2 - 0.5 = -0.25 (clamped to 0), 0.25, 0.75, 1.25 (past
    # the last sample, which then repeats).
    assert resize(torch.tensor([[[0.0, 1.0]]]), (1, 4)).tolist() == [[[0.0, 0.25, 0.75, 1.0]]]


def test_same_size_is_the_input_itself_and_inputs_are_untouched():
    maps = torch.rand(2, 3, 4)
    assert resize(maps, (3, 4)) is maps
    before = maps.clone()
    resize(maps, (6, 8))
    assert torch.equal(maps, before)


@pytest.mark.parametrize("bad, match", [(torch.zeros(3), "h x w"), (torch.zeros(2, 3, dtype=torch.uint8), "floating")])
def test_bad_maps_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        resize(bad, (6, 8))


@pytest.mark.parametrize("grid, size", SIZES)
def test_adjoint_pools_what_the_resized_map_would_pool(grid, size):
    # For weights on the resized grid: sum(W * resize(F)) = sum(resize_adjoint(W) * F).
    rng = np.random.default_rng(7)
    features = torch.as_tensor(rng.normal(size=(5, *grid)))
    weights = torch.as_tensor(rng.uniform(0, 1, (3, *size)))
    pooled = weights.flatten(1) @ resize(features, size).flatten(1).T
    adjoint = resize_adjoint(weights, grid)
    assert adjoint.shape == (3, *grid)
    torch.testing.assert_close(adjoint.flatten(1) @ features.flatten(1).T, pooled, atol=1e-10, rtol=1e-12)
    torch.testing.assert_close(adjoint.sum(dim=(1, 2)), weights.sum(dim=(1, 2)), atol=1e-10, rtol=0)  # mass kept


def test_adjoint_by_hand():
    # 1 x 2 -> 1 x 4 has rows (1, 0), (.75, .25), (.25, .75), (0, 1): the adjoint of e_1 + e_2 is (1, 1).
    assert resize_adjoint(torch.tensor([[[0.0, 1.0, 1.0, 0.0]]]), (1, 2)).tolist() == [[[1.0, 1.0]]]


@pytest.mark.parametrize("grid, size", SIZES)
def test_resized_norms_are_the_norms_of_the_resized_cells(grid, size):
    features = torch.as_tensor(np.random.default_rng(3).normal(size=(2, 6, *grid)))
    expected = torch.linalg.vector_norm(_interpolate(features, size), dim=1)
    torch.testing.assert_close(resized_norms(features, size), expected, atol=1e-12, rtol=1e-12)


def test_cell_index_divisible_and_not():
    assert cell_index(4, 6, (2, 3)).tolist() == [[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2], [3, 3, 4, 4, 5, 5], [3, 3, 4, 4, 5, 5]]
    # H = 5 over 2 cells: cell 0 covers rows [0, 2.5) = 0, 1, 2; cell 1 rows 3, 4.
    assert cell_index(5, 1, (2, 1))[:, 0].tolist() == [0, 0, 0, 1, 1]
