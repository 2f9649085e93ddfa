"""CAP (Appendix A.1): cell fractions soft vs majority, centroids, cosine and heat maps."""
import warnings

import numpy as np
import pytest

from dhr_label.core.cap import cell_index, class_cell_fractions, class_centroids, cosine_maps, heat_maps, minmax_rows
from dhr_label.params import CapMode

# 4 x 4 mask over a 2 x 2 grid (2 x 2 pixels a cell); 255 = ignore.
MASK = np.array(
    [
        [1, 1, 2, 255],
        [1, 2, 2, 2],
        [0, 0, 255, 255],
        [0, 1, 255, 255],
    ],
    dtype=np.uint8,
)
CLASSES = np.array([0, 1, 2])


def test_cell_index_divisible_and_not():
    np.testing.assert_array_equal(
        cell_index(4, 6, (2, 3)),
        [[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2], [3, 3, 4, 4, 5, 5], [3, 3, 4, 4, 5, 5]],
    )
    # H = 5 over 2 cells: cell 0 covers rows [0, 2.5) = 0, 1, 2; cell 1 rows 3, 4.
    np.testing.assert_array_equal(cell_index(5, 1, (2, 1))[:, 0], [0, 0, 0, 1, 1])


def test_soft_fractions_by_hand():
    # Cells (row-major): TL = 1,1,1,2; TR = 2,255,2,2; BL = 0,0,0,1; BR = all ignore.
    expected = np.array(
        [
            [0.00, 0.00, 0.75, 0.0],
            [0.75, 0.00, 0.25, 0.0],
            [0.25, 0.75, 0.00, 0.0],
        ]
    )
    out = class_cell_fractions(MASK, CLASSES, (2, 2), mode="soft")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-7)


def test_ignore_pixels_count_for_nobody():
    out = class_cell_fractions(MASK, CLASSES, (2, 2), mode="soft")
    # Each cell's weights sum to its labelled share: 1, 3/4 (one ignore), 1, 0 (all ignore).
    np.testing.assert_allclose(out.sum(axis=0), [1.0, 0.75, 1.0, 0.0], atol=1e-7)
    assert class_cell_fractions(MASK, CLASSES, (2, 2), mode="majority")[:, 3].sum() == 0


def test_majority_by_hand():
    expected = np.array([[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0]], dtype=np.float32)
    np.testing.assert_array_equal(class_cell_fractions(MASK, CLASSES, (2, 2), mode="majority"), expected)


def test_majority_ties_go_to_the_lower_id():
    # One 2 x 2 cell: two pixels of class 3 and two ignore -> class 3 (3 < 255).
    half_ignore = np.array([[3, 255], [3, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(class_cell_fractions(half_ignore, np.array([3]), (1, 1), mode="majority"), [[1.0]])
    # Two pixels of 3 and two of 5 -> class 3.
    half_half = np.array([[5, 3], [3, 5]], dtype=np.uint8)
    np.testing.assert_array_equal(
        class_cell_fractions(half_half, np.array([3, 5]), (1, 1), mode="majority"), [[1.0], [0.0]]
    )
    # One of 3, three ignore -> nobody.
    mostly_ignore = np.array([[3, 255], [255, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(class_cell_fractions(mostly_ignore, np.array([3]), (1, 1), mode="majority"), [[0.0]])


def _thin_line_scene():
    """32 x 32 pixels over a 4 x 4 grid (8 x 8-pixel cells); class 7 is a 1-pixel vertical line."""
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:, 11] = 7
    rng = np.random.default_rng(0)
    features = rng.normal(size=(5, 16)).astype(np.float32)
    return mask, np.array([0, 7]), features


def test_thin_class_keeps_a_centroid_with_soft_cap_only():
    mask, classes, features = _thin_line_scene()
    soft = class_cell_fractions(mask, classes, (4, 4), mode="soft")
    # The line runs through the 4 cells of grid column 1, 8 of their 64 pixels each.
    expected = np.zeros(16)
    expected[[1, 5, 9, 13]] = 1 / 8
    np.testing.assert_allclose(soft[1], expected, atol=1e-7)
    centroids, present = class_centroids(features, soft)
    assert present.tolist() == [True, True]
    np.testing.assert_allclose(centroids[1], features[:, [1, 5, 9, 13]].mean(axis=1), atol=1e-6)

    majority = class_cell_fractions(mask, classes, (4, 4), mode="majority")
    assert majority[1].sum() == 0
    assert class_centroids(features, majority)[1].tolist() == [True, False]


def test_thin_class_heat_map_through_step_2():
    mask, classes, features = _thin_line_scene()
    uss = features.reshape(5, 4, 4)
    flat = uss.reshape(5, -1)
    soft_maps, _ = heat_maps(flat, class_cell_fractions(mask, classes, (4, 4), mode=CapMode.soft.value))
    majority_maps, centroids = heat_maps(flat, class_cell_fractions(mask, classes, (4, 4), mode=CapMode.majority.value))
    assert soft_maps[1].max() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_array_equal(majority_maps[1], 0.0)  # no centroid, no heat
    np.testing.assert_array_equal(centroids[1], 0.0)


def test_feature_grid_larger_than_the_image():
    # 2 x 3 pixels, 4 x 6 cells: pixel rows land in cell rows 0 and 2, columns in 0, 2, 4;
    # the other cells hold no pixel and must get weight 0 without a division warning.
    mask = np.array([[1, 1, 2], [2, 255, 1]], dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        soft = class_cell_fractions(mask, np.array([1, 2]), (4, 6), mode="soft")
        majority = class_cell_fractions(mask, np.array([1, 2]), (4, 6), mode="majority")
    expected = np.zeros((2, 24), dtype=np.float32)
    expected[0, [0, 2, 16]] = 1.0  # class 1 at pixels (0,0), (0,1), (1,2)
    expected[1, [4, 12]] = 1.0  # class 2 at pixels (0,2), (1,0); (1,1) is ignore
    np.testing.assert_array_equal(soft, expected)
    np.testing.assert_array_equal(majority, expected)
    features = np.arange(2 * 24, dtype=np.float32).reshape(2, 24)
    centroids, present = class_centroids(features, soft)
    assert present.all()
    np.testing.assert_allclose(centroids[0], features[:, [0, 2, 16]].mean(axis=1), atol=1e-5)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="soft' or 'majority"):
        class_cell_fractions(MASK, CLASSES, (2, 2), mode="vote")


def test_centroids_by_hand():
    features = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    weights = np.array([[1.0, 1.0, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 0.0]])
    centroids, present = class_centroids(features, weights)
    np.testing.assert_allclose(centroids, [[1.5, 0.0], [2.5, 3.0], [0.0, 0.0]], atol=1e-6)
    assert present.tolist() == [True, True, False]


def test_cosine_maps_by_hand():
    features = np.array([[1.0, 0.0, -2.0, 3.0], [0.0, 5.0, 0.0, 3.0]])  # D = 2, N = 4 cells
    centroids = np.array([[2.0, 0.0], [0.0, 0.0]])
    out = cosine_maps(features, centroids)
    np.testing.assert_allclose(out[0], [1.0, 0.0, -1.0, np.sqrt(0.5)], atol=1e-6)
    np.testing.assert_array_equal(out[1], 0.0)  # a zero centroid is similar to nothing


def test_minmax_rows_known_values():
    out = minmax_rows(np.array([[1.0, 3.0, 5.0], [2.0, 2.0, 2.0]]))
    np.testing.assert_allclose(out, [[0.0, 0.5, 1.0], [0.0, 0.0, 0.0]], atol=1e-7)


def test_heat_maps_range_and_absent_class():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(4, 12)).astype(np.float32)
    weights = np.zeros((3, 12), dtype=np.float32)
    weights[0, :6] = 1.0
    weights[1, 6:] = 0.5
    maps, centroids = heat_maps(features, weights)
    assert maps.shape == (3, 12) and maps.dtype == np.float32
    np.testing.assert_allclose(maps[:2].min(axis=1), 0.0, atol=1e-6)
    np.testing.assert_allclose(maps[:2].max(axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(maps[2], 0.0)
    np.testing.assert_allclose(centroids[1], features[:, 6:].mean(axis=1), atol=1e-6)
