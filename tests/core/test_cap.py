"""CAP (Appendix A.1): cell fractions soft and majority, centroids, cosines, min-max, heat maps,
prototype blending and Step 3.1's class correlations — known answers on tiny arrays."""
import warnings

import numpy as np
import pytest
import torch

from dhr_label.core.cap import (
    blend_centroids,
    cell_fractions,
    class_centroids,
    correlated_groups,
    cosine_maps,
    heat_maps,
    minmax,
    posterior_support,
)
from dhr_label.core.resize import resize

# 4 x 4 mask over a 2 x 2 grid (2 x 2 pixels a cell); 255 = ignore.
MASK = torch.tensor([[1, 1, 2, 255], [1, 2, 2, 2], [0, 0, 255, 255], [0, 1, 255, 255]], dtype=torch.uint8)
CLASSES = np.array([0, 1, 2])


def fractions(mask, classes, grid, mode="soft"):
    weights, cells = cell_fractions([torch.as_tensor(mask)], [classes], [grid], mode=mode)
    assert cells.all()
    return weights[0].numpy()


def test_soft_fractions_by_hand():
    # Cells (row-major): TL = 1,1,1,2; TR = 2,255,2,2; BL = 0,0,0,1; BR = all ignore.
    expected = [[0.00, 0.00, 0.75, 0.0], [0.75, 0.00, 0.25, 0.0], [0.25, 0.75, 0.00, 0.0]]
    np.testing.assert_array_equal(fractions(MASK, CLASSES, (2, 2)), expected)  # exact: counts over counts
    # Each cell's weights sum to its labelled share: 1, 3/4 (one ignore), 1, 0 (all ignore).
    assert fractions(MASK, CLASSES, (2, 2)).sum(axis=0).tolist() == [1.0, 0.75, 1.0, 0.0]


def test_majority_by_hand():
    np.testing.assert_array_equal(fractions(MASK, CLASSES, (2, 2), "majority"), [[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0]])


def test_majority_ties_go_to_the_lower_id():
    # two pixels of class 3 and two ignore -> class 3; two of 3 and two of 5 -> class 3;
    # one of 3, three ignore -> nobody
    assert fractions(torch.tensor([[3, 255], [3, 255]], dtype=torch.uint8), [3], (1, 1), "majority").tolist() == [[1.0]]
    assert fractions(torch.tensor([[5, 3], [3, 5]], dtype=torch.uint8), [3, 5], (1, 1), "majority").tolist() == [[1.0], [0.0]]
    assert fractions(torch.tensor([[3, 255], [255, 255]], dtype=torch.uint8), [3], (1, 1), "majority").tolist() == [[0.0]]


def test_a_thin_class_keeps_its_weight_with_soft_cap_only():
    # 32 x 32 pixels over a 4 x 4 grid (8 x 8-pixel cells); class 7 is a 1-pixel vertical line
    # through the 4 cells of grid column 1, 8 of their 64 pixels each
    mask = torch.zeros(32, 32, dtype=torch.uint8)
    mask[:, 11] = 7
    expected = np.zeros(16)
    expected[[1, 5, 9, 13]] = 1 / 8
    np.testing.assert_allclose(fractions(mask, [0, 7], (4, 4))[1], expected, atol=1e-15)
    assert fractions(mask, [0, 7], (4, 4), "majority")[1].sum() == 0


def test_a_feature_grid_larger_than_the_image():
    # 2 x 3 pixels, 4 x 6 cells: pixel rows land in cell rows 0 and 2, columns in 0, 2, 4; the
    # other cells hold no pixel and get weight 0 without a division warning
    mask = torch.tensor([[1, 1, 2], [2, 255, 1]], dtype=torch.uint8)
    expected = np.zeros((2, 24))
    expected[0, [0, 2, 16]] = 1.0  # class 1 at pixels (0,0), (0,1), (1,2)
    expected[1, [4, 12]] = 1.0  # class 2 at pixels (0,2), (1,0); (1,1) is ignore
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for mode in ("soft", "majority"):
            np.testing.assert_array_equal(fractions(mask, [1, 2], (4, 6), mode), expected)


def test_a_batch_pads_classes_and_cells_and_counts_each_image_alone():
    rng = np.random.default_rng(6)
    masks = [torch.as_tensor(rng.integers(0, 4, (97, 131)).astype(np.uint8)), torch.as_tensor(rng.integers(0, 3, (50, 40)).astype(np.uint8))]
    masks[0][:5] = 255
    masks[1][masks[1] == 2] = 7
    classes, grids = [np.array([0, 1, 3]), np.array([0, 7])], [(12, 16), (7, 5)]
    for mode in ("soft", "majority"):
        weights, cells = cell_fractions(masks, classes, grids, mode=mode)
        assert weights.shape == (2, 3, 12 * 16) and cells.sum(dim=1).tolist() == [192, 35]
        for b in range(2):
            alone = fractions(masks[b], classes[b], grids[b], mode)
            g, n = alone.shape
            np.testing.assert_array_equal(weights[b, :g, :n].numpy(), alone)
            assert float(weights[b, g:].sum()) == 0 and float(weights[b, :, n:].sum()) == 0


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="soft' or 'majority"):
        cell_fractions([MASK], [CLASSES], [(2, 2)], mode="vote")


def test_centroids_by_hand_on_the_same_and_on_a_finer_grid():
    features = torch.tensor([[[[1.0, 2.0, 3.0]], [[0.0, 0.0, 6.0]]]], dtype=torch.float64)  # B=1, D=2, 1 x 3
    weights = torch.tensor([[[[1.0, 1.0, 0.0]], [[0.0, 0.5, 0.5]], [[0.0, 0.0, 0.0]]]], dtype=torch.float64)
    centroids, present = class_centroids(features, weights)
    np.testing.assert_allclose(centroids[0].numpy(), [[1.5, 0.0], [2.5, 3.0], [0.0, 0.0]], atol=1e-15)
    assert present[0].tolist() == [True, True, False]
    # Weights on a 2 x 5 grid pool the features resized to it, which are never materialised.
    fine = torch.rand(1, 3, 2, 5, dtype=torch.float64)
    expected = (fine.flatten(2) @ resize(features, (2, 5)).flatten(2).mT) / fine.sum(dim=(2, 3))[..., None]
    torch.testing.assert_close(class_centroids(features, fine)[0], expected, atol=1e-14, rtol=1e-12)


def test_cosine_maps_by_hand_and_on_a_finer_grid():
    features = torch.tensor([[[[1.0, 0.0, -2.0, 3.0]], [[0.0, 5.0, 0.0, 3.0]]]], dtype=torch.float64)  # D = 2, 1 x 4
    centroids = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    out = cosine_maps(features, centroids, (1, 4))[0].numpy()
    np.testing.assert_allclose(out[0], [1.0, 0.0, -1.0, np.sqrt(0.5)], atol=1e-15)
    np.testing.assert_array_equal(out[1], 0.0)  # a zero centroid is similar to nothing
    up = resize(features, (3, 7))
    expected = torch.nn.functional.cosine_similarity(up.flatten(2)[:, None], centroids[:, :1, :, None], dim=2)
    torch.testing.assert_close(cosine_maps(features, centroids, (3, 7))[:, :1], expected, atol=1e-14, rtol=1e-12)


def test_minmax_known_values_clip_and_padding():
    out = minmax(torch.tensor([[1.0, 3.0, 5.0], [2.0, 2.0, 2.0]]), -1)
    assert out.tolist() == [[0.0, 0.5, 1.0], [0.0, 0.0, 0.0]]  # a flat row: 0, not NaN
    # span 4e-6 < clip 1e-5: divided by the clip, so it stops short of 1
    np.testing.assert_allclose(minmax(torch.tensor([[0.0, 4e-6, 2e-6]], dtype=torch.float64), -1).numpy(), [[0.0, 0.4, 0.2]], atol=1e-12)
    valid = torch.tensor([[True, True, True, False]])
    assert minmax(torch.tensor([[1.0, 3.0, 5.0, 100.0]]), -1, valid=valid).tolist() == [[0.0, 0.5, 1.0, 0.0]]


def test_heat_maps_range_absent_class_and_a_thin_class():
    rng = np.random.default_rng(3)
    features = torch.as_tensor(rng.normal(size=(1, 4, 3, 4)))
    weights = torch.zeros(1, 3, 3, 4, dtype=torch.float64)
    weights[0, 0, :, :2] = 1.0
    weights[0, 1, :, 2:] = 0.5
    maps, centroids = heat_maps(features, weights)
    assert maps.shape == (1, 3, 12)
    np.testing.assert_allclose(maps[0, :2].amin(dim=1).numpy(), 0.0, atol=1e-15)
    np.testing.assert_allclose(maps[0, :2].amax(dim=1).numpy(), 1.0, atol=1e-15)
    assert float(maps[0, 2].abs().sum()) == 0.0 and float(centroids[0, 2].abs().sum()) == 0.0  # no weight: no heat
    np.testing.assert_allclose(centroids[0, 1].numpy(), features[0, :, :, 2:].mean(dim=(1, 2)).numpy(), atol=1e-14)


def test_blend_centroids_known_answer_and_fallbacks():
    local = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 4.0], [0.0, 0.0]])
    proto = torch.tensor([[0.0, 1.0], [0.0, 3.0], [0.0, 0.0], [0.0, 0.0]])
    out = blend_centroids(local, torch.tensor([True, False, True, False]), proto, 0.25)
    assert out.tolist() == [[0.75, 0.25], [0.0, 1.0], [0.0, 1.0], [0.0, 0.0]]  # both; prototype; local; neither


def test_blended_heat_maps_move_the_peak_to_the_prototype():
    # three cells along (1,0), (1,1), (0,1); the class's weight is on cell 0, its prototype (0,1)
    features = torch.tensor([[[[1.0, 1.0, 0.0]], [[0.0, 1.0, 1.0]]]], dtype=torch.float64)
    weights = torch.tensor([[[[1.0, 0.0, 0.0]]]], dtype=torch.float64)
    proto = torch.tensor([[[0.0, 1.0]]], dtype=torch.float64)
    plain, _ = heat_maps(features, weights)
    assert torch.equal(heat_maps(features, weights, prototypes=proto, weight=0.0)[0], plain)  # weight 0: the paper
    np.testing.assert_allclose(plain[0, 0].numpy(), [1.0, 2**-0.5, 0.0], atol=1e-15)
    moved, centroids = heat_maps(features, weights, prototypes=proto, weight=1.0)
    np.testing.assert_allclose(moved[0, 0].numpy(), [0.0, 2**-0.5, 1.0], atol=1e-15)
    torch.testing.assert_close(centroids, proto)


def _unit(*xs):
    v = torch.tensor(xs, dtype=torch.float64)
    return v / torch.linalg.vector_norm(v)


def test_correlated_groups_by_hand():
    centroids = torch.stack([
        _unit(1, 0, 0),
        _unit(0.9, np.sqrt(1 - 0.81), 0),  # cos 0.9 with 0
        _unit(0.7, 0, np.sqrt(1 - 0.49)),  # cos 0.7 with 0, 0.63 with 1
        _unit(-1, 0, 0),  # cos -1, -0.9, -0.7: ReLU'd to 0
    ]) * torch.tensor([[1.0], [2.0], [0.5], [3.0]], dtype=torch.float64)  # scale-free
    assert correlated_groups(centroids[None], [4], 0.8) == [[[0, 1]]]
    assert correlated_groups(centroids[None], [4], 0.6) == [[[0, 1, 2], [1, 2]]]  # j > i only: no [1, 0]
    assert correlated_groups(centroids[None], [4], 0.0) == [[[0, 1, 2], [1, 2]]]  # negatives never group
    assert correlated_groups(centroids[None], [4], 0.95) == [[]]
    assert correlated_groups(centroids[None], [2], 0.6) == [[[0, 1]]]  # only the image's own rows count


def test_tau_one_gives_no_groups_even_for_parallel_centroids():
    rng = np.random.default_rng(0)
    for _ in range(50):
        v = torch.as_tensor(rng.normal(size=16))
        assert correlated_groups(torch.stack([v, 3 * v, v])[None], [3], 1.0) == [[]]


def test_posterior_support_ignores_padded_class_slots():
    # An image padded with a third, empty class slot (as in a batch) keeps its support: the padded
    # slot takes no share of the posterior and gets no weight, even with a prior.
    rng = np.random.default_rng(5)
    features = torch.as_tensor(rng.normal(size=(1, 4, 3, 5)))
    weights = torch.as_tensor(rng.random((1, 2, 3, 5)))
    alone = posterior_support(features, weights, torch.tensor([[True, True]]), temperature=0.05, prior=0.1)
    padded = torch.cat([weights, torch.zeros(1, 1, 3, 5, dtype=weights.dtype)], dim=1)
    batch = posterior_support(features, padded, torch.tensor([[True, True, False]]), temperature=0.05, prior=0.1)
    torch.testing.assert_close(batch[:, :2], alone, rtol=0, atol=1e-15)
    assert torch.equal(batch[:, 2], torch.zeros_like(batch[:, 2]))
    # with the prior, every real cell's posterior sums to one over the classes
    posterior = alone / (weights.flatten(2) + 0.1)
    torch.testing.assert_close(posterior.sum(dim=1), torch.ones(1, 15, dtype=torch.float64), rtol=0, atol=1e-12)
