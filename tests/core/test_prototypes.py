"""Dataset-level class prototypes (ours) and the WSS heat-map mix of Step 2: tiny known answers."""
import numpy as np
import pytest

from dhr_label.core.cap import blend_centroids, heat_maps
from dhr_label.core.dhr import rebalance, rebalance_heat
from dhr_label.core.pipeline import ImageState, init_classes
from dhr_label.core.prototypes import Prototypes, add_sums, finish, image_sums
from dhr_label.params import DHRParams, Steps

TOL = 1e-6  # float32 rounding of unit vectors and cosines
PAPER = DHRParams(prototype_weight=0.0, wss_heat_weight=0.0, guard=0.0)  # the paper's Steps 2-3


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
    np.testing.assert_allclose(protos.uss[0], [0.0, 0.0])  # never seen: a zero row
    assert len(protos.wss) == 1 and protos.wss[0].shape == (3, 3)
    np.testing.assert_allclose(protos.wss[0][1], np.full(3, 3**-0.5), atol=TOL)


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


def test_blend_centroids_known_answer_and_fallbacks():
    local = np.array([[2.0, 0.0], [0.0, 0.0], [0.0, 4.0], [0.0, 0.0]])
    proto = np.array([[0.0, 1.0], [0.0, 3.0], [0.0, 0.0], [0.0, 0.0]])
    present = np.array([True, False, True, False])
    out = blend_centroids(local, present, proto, 0.25)
    np.testing.assert_allclose(out[0], [0.75, 0.25], atol=TOL)  # both: the weighted unit vectors
    np.testing.assert_allclose(out[1], [0.0, 1.0], atol=TOL)  # no local centroid: the prototype
    np.testing.assert_allclose(out[2], [0.0, 1.0], atol=TOL)  # no prototype: the local one
    np.testing.assert_allclose(out[3], [0.0, 0.0])  # neither: zero
    np.testing.assert_allclose(blend_centroids(local, present, proto, 1.0)[0], [0.0, 1.0], atol=TOL)


def test_blended_heat_maps_move_the_peak_to_the_prototype():
    # three cells along (1,0), (1,1), (0,1); the class's weight is on cell 0, its prototype (0,1)
    features = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]], dtype=np.float32)
    weights = np.array([[1.0, 0.0, 0.0]], dtype=np.float32)
    proto = np.array([[0.0, 1.0]], dtype=np.float32)
    plain, _ = heat_maps(features, weights)
    same, _ = heat_maps(features, weights, prototypes=proto, weight=0.0)
    np.testing.assert_array_equal(same, plain)  # weight 0 is the paper's heat map exactly
    np.testing.assert_allclose(plain[0], [1.0, 2**-0.5, 0.0], atol=1e-5)
    moved, centroids = heat_maps(features, weights, prototypes=proto, weight=1.0)
    np.testing.assert_allclose(moved[0], [0.0, 2**-0.5, 1.0], atol=1e-5)
    np.testing.assert_allclose(centroids, proto, atol=TOL)


def _scene(seed=3):
    rng = np.random.default_rng(seed)
    init = np.zeros((16, 16), dtype=np.uint8)
    init[:, 8:] = 1
    init[4:8, 2:6] = 2
    uss = rng.normal(size=(6, 4, 4)).astype(np.float32)
    wss = [rng.normal(size=(5, 4, 4)).astype(np.float32), rng.normal(size=(7, 2, 2)).astype(np.float32)]
    protos = Prototypes(uss=rng.normal(size=(3, 6)).astype(np.float32),
                        wss=(rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=(3, 7)).astype(np.float32)))
    return init, uss, wss, protos


def _heat(init, uss, wss, params, protos=None):
    state = ImageState(None, np.zeros(0, np.int64), None, None, uss, wss, prototypes=protos, init=init)
    state.classes = init_classes(init)
    return rebalance_heat(state, params)[0]


def test_zero_weights_or_no_prototypes_are_the_paper():
    init, uss, wss, protos = _scene()
    paper = _heat(init, uss, wss, PAPER)
    np.testing.assert_array_equal(_heat(init, uss, wss, PAPER, protos), paper)  # weight 0
    np.testing.assert_array_equal(_heat(init, uss, wss, PAPER.replace(prototype_weight=0.8)), paper)  # none given


def test_prototypes_and_the_wss_mix_change_the_heat_maps_of_full_dhr_only():
    init, uss, wss, protos = _scene()
    paper = _heat(init, uss, wss, PAPER)
    blended = _heat(init, uss, wss, PAPER.replace(prototype_weight=1.0), protos)
    mixed = _heat(init, uss, wss, PAPER.replace(wss_heat_weight=1.0))
    assert not np.allclose(blended, paper) and not np.allclose(mixed, paper)
    assert blended.shape == mixed.shape == (3, 4, 4)
    assert 0.0 <= mixed.min() and mixed.max() <= 1.0
    row5, row6 = PAPER.replace(steps=Steps.row(5)), PAPER.replace(steps=Steps.row(6))
    # the mix is a change of full DHR's Step 2: USS alone (row 5) has no WSS maps to mix
    np.testing.assert_array_equal(_heat(init, uss, None, row5.replace(wss_heat_weight=1.0)), _heat(init, uss, None, row5))
    # the prototypes live on the USS grid: WSS alone (row 6) keeps its own centroids
    np.testing.assert_array_equal(_heat(init, None, wss, row6.replace(prototype_weight=1.0), protos), _heat(init, None, wss, row6))


def test_rebalance_with_prototypes_keeps_shape_and_classes():
    init, uss, wss, protos = _scene()
    state = rebalance(init, uss=uss, wss=wss, params=DHRParams(prototype_weight=0.75, wss_heat_weight=0.5), crf=None, prototypes=protos)
    assert state.mask.shape == init.shape and state.mask.dtype == np.uint8
    assert set(np.unique(state.mask)) <= {0, 1, 2}


@pytest.mark.parametrize("name", ["prototype_weight", "wss_heat_weight"])
@pytest.mark.parametrize("value", [-0.1, 1.1])
def test_params_check_the_weights(name, value):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        DHRParams(**{name: value})
