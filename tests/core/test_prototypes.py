"""Dataset-level class prototypes (ours): the map/reduce of image sums, on tiny known answers."""
import numpy as np
import pytest
import torch

from dhr_label.core.cap import l2_normalise
from dhr_label.core.prototypes import Prototypes, add_sums, finish, image_sums
from dhr_label.core.resize import resize

TOL = 1e-12  # float64 sums of unit vectors


def test_image_sums_map_reduce_to_the_class_means():
    # a 4 x 4 mask on a 2 x 2 grid: class 1 fills the top half, class 2 the bottom-left cell,
    # ignore the bottom-right; class 0 is absent
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [2, 2, 255, 255], [2, 2, 255, 255]], dtype=np.uint8)
    uss = np.zeros((2, 2, 2), dtype=np.float32)
    uss[:, 0, 0], uss[:, 0, 1], uss[:, 1, 0], uss[:, 1, 1] = (2, 0), (0, 5), (0, 1), (1, 1)
    wss = [np.ones((3, 1, 1), dtype=np.float32)]  # one cell, resized to the 2 x 2 grid
    parts = image_sums(mask, uss, wss, 3)
    protos = finish(add_sums(parts, parts))  # two identical images: the same means
    np.testing.assert_allclose(protos.uss[1], [0.5, 0.5], atol=TOL)  # mean of the unit vectors (1,0) and (0,1)
    np.testing.assert_allclose(protos.uss[2], [0.0, 1.0], atol=TOL)
    np.testing.assert_array_equal(protos.uss[0], [0.0, 0.0])  # never seen: a zero row
    assert len(protos.wss) == 1 and protos.wss[0].shape == (3, 3)
    np.testing.assert_allclose(protos.wss[0][1], np.full(3, 3**-0.5), atol=1e-7)  # float32 prototypes


def test_wss_sums_are_those_of_the_layer_resized_to_the_uss_grid():
    rng = np.random.default_rng(2)
    mask = rng.integers(0, 3, (24, 32)).astype(np.uint8)
    uss = rng.normal(size=(4, 6, 8)).astype(np.float32)
    layer = rng.normal(size=(5, 3, 4))
    (_, mass), (sums, _) = image_sums(mask, uss, [layer], 3)
    unit = l2_normalise(resize(torch.as_tensor(layer), (6, 8)).reshape(5, -1), 0)  # explicitly resized, per cell
    counts = np.stack([np.bincount(((np.arange(24)[:, None] // 4) * 8 + np.arange(32)[None] // 4)[mask == c], minlength=48)
                       for c in range(3)]) / 16.0
    np.testing.assert_allclose(sums, counts @ unit.numpy().T, atol=1e-12)
    np.testing.assert_allclose(mass, counts.sum(axis=1), atol=1e-12)


def test_image_sums_take_tensors_too():
    mask = np.array([[0, 1], [1, 1]], np.uint8)
    uss = np.random.default_rng(0).normal(size=(3, 1, 2))
    from_arrays = image_sums(mask, uss, None, 2)
    from_tensors = image_sums(torch.as_tensor(mask), torch.as_tensor(uss), None, 2)
    np.testing.assert_array_equal(from_arrays[0][0], from_tensors[0][0])


def test_sums_of_images_with_other_sources_are_refused():
    one = [(np.zeros((2, 3)), np.zeros(2))]
    assert add_sums(None, one) is one and add_sums(one, None) is one
    with pytest.raises(ValueError, match="same feature sources"):
        add_sums(one, one + one)
    with pytest.raises(ValueError, match="same feature sources"):
        add_sums(one, [(np.zeros((2, 4)), np.zeros(2))])


def test_prototypes_check_the_class_count():
    with pytest.raises(ValueError, match="one C"):
        Prototypes(uss=np.zeros((3, 4)), wss=(np.zeros((2, 4)),))
