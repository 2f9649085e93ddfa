"""Bilinear resize, align_corners=False: torch's F.interpolate is the independent reference."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dhr_label.core.resize import interpolation_matrix, resize_bilinear

ATOL = 1e-6  # values in [0, 1], float32 arithmetic on both sides


@pytest.mark.parametrize(
    "shape, size",
    [
        ((3, 4, 5), (8, 10)),  # 2x up
        ((2, 6, 8), (24, 32)),  # 4x up (feature grid -> image)
        ((3, 8, 10), (4, 5)),  # 2x down
        ((2, 9, 7), (4, 3)),  # down by a non-integer factor
        ((2, 7, 9), (3, 13)),  # down in one axis, up in the other
        ((1, 1, 1), (4, 6)),  # 1 x 1 up
        ((2, 5, 6), (1, 1)),  # down to 1 x 1
        ((1, 1, 5), (3, 5)),  # one axis unchanged
    ],
)
def test_agrees_with_torch_interpolate(shape, size):
    maps = np.random.default_rng(sum(shape) + sum(size)).uniform(0, 1, shape).astype(np.float32)
    ours = resize_bilinear(maps, size)
    theirs = F.interpolate(torch.from_numpy(maps)[None], size=size, mode="bilinear", align_corners=False)[0]
    assert ours.shape == (shape[0], *size) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs.numpy(), atol=ATOL)


def test_hand_computed_row():
    # 1 x 2 -> 1 x 4: source x = (i + 0.5) / 2 - 0.5 = -0.25 (clamped to 0), 0.25, 0.75, 1.25 (past
    # the last sample, which then repeats).
    out = resize_bilinear(np.array([[[0.0, 1.0]]]), (1, 4))
    np.testing.assert_allclose(out, [[[0.0, 0.25, 0.75, 1.0]]], atol=1e-7)


def test_interpolation_rows_sum_to_one():
    for n_in, n_out in [(4, 9), (9, 4), (1, 5), (5, 1)]:
        np.testing.assert_allclose(interpolation_matrix(n_in, n_out).sum(axis=1), 1.0, atol=1e-6)


def test_same_size_is_a_copy_and_the_input_is_untouched():
    maps = np.random.default_rng(0).uniform(0, 1, (2, 3, 4)).astype(np.float32)
    before = maps.copy()
    same = resize_bilinear(maps, (3, 4))
    assert same is not maps
    np.testing.assert_array_equal(same, maps)
    resize_bilinear(maps, (6, 8))
    np.testing.assert_array_equal(maps, before)


def test_two_dimensional_input_is_refused():
    with pytest.raises(ValueError, match="C x h x w"):
        resize_bilinear(np.zeros((3, 4)), (6, 8))
