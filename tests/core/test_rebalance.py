"""Steps 2-3 (Eqs. 3-4) and the final mask: rebalancing tiny scenes with a known answer, the WSS
groups, our additions (prototypes, the WSS mix, the vanished-class guard) and the batch."""
import numpy as np
import pytest
import torch

from dhr_label.core import rebalance as stage
from dhr_label.core.cap import cell_fractions, l2_normalise
from dhr_label.core.dhr import rebalance
from dhr_label.core.pipeline import class_counts, new_state, present_classes
from dhr_label.core.prototypes import Prototypes
from dhr_label.core.rebalance import grid_heat_maps, grid_support, guard_vanished, rebalance_heat
from dhr_label.core.resize import resize
from dhr_label.params import PAPER_STEPS_2_3, DHRParams, Steps

from .scenes import two_halves_scene

PAPER = DHRParams(**PAPER_STEPS_2_3)  # the paper's Steps 2-3


def _row(row: int, **changes) -> DHRParams:
    return DHRParams(steps=Steps.row(row), **changes)


@pytest.mark.parametrize("row", [5, 6, 7])
def test_rebalance_corrects_a_mislabelled_block(row):
    # Soft CAP: V_2 = e2, V_1 = (24 e1 + 4 e2) / 28, so the wrong block's cells are nearer V_2.
    truth, init, image, uss = two_halves_scene()
    params = _row(row)
    out = rebalance(init, uss=uss if params.steps.uss else None, wss=[uss] if params.steps.wss else None, params=params, image=image)
    assert out.mask.dtype == np.uint8
    np.testing.assert_array_equal(out.mask, truth)
    assert out.groups == []  # cos(V_1, V_2) = 4 / sqrt(24^2 + 4^2) = 0.16 < tau


def test_rebalance_groups_classes_the_uss_cannot_tell_apart():
    # USS centroids of 1 and 2 at cos 1 / 1.04 = 0.96 > tau = 0.8; the WSS layer separates them.
    truth, init, image, _ = two_halves_scene()
    rng = np.random.default_rng(4)
    truth[:, 28:] = 0
    init[:, 28:] = 0
    image[:, 28:] = 255
    cells = truth[::4, ::4]
    uss = np.zeros((4, 6, 8), dtype=np.float32)
    uss[0] = np.isin(cells, [1, 2])
    uss[1] = 0.2 * (cells == 1)
    uss[2] = 0.2 * (cells == 2)
    uss[3] = cells == 0
    uss += rng.normal(0, 0.01, uss.shape).astype(np.float32)
    wss = np.stack([cells == 1, cells == 2, cells == 0]).astype(np.float32)
    wss += rng.normal(0, 0.05, wss.shape).astype(np.float32)
    out = rebalance(init, uss=uss, wss=[wss], params=_row(7), image=image)
    assert out.groups == [[1, 2]]
    np.testing.assert_array_equal(out.mask, truth)


def test_one_class_or_one_feature_cell_keeps_m_init():
    init = np.full((4, 6), 3, dtype=np.uint8)
    init[0, 0] = 255
    out = rebalance(init, uss=np.zeros((2, 2, 3), np.float32), wss=None, params=_row(5))
    np.testing.assert_array_equal(out.mask, init)
    assert out.groups == [] and out.classes is None
    init = np.zeros((6, 6), dtype=np.uint8)
    init[:3] = 2
    np.testing.assert_array_equal(rebalance(init, uss=np.ones((5, 1, 1), np.float32), wss=None, params=_row(5)).mask, init)


def test_missing_feature_source_is_named():
    with pytest.raises(ValueError, match="USS"):
        rebalance(np.zeros((6, 6), np.uint8), uss=None, wss=None, params=_row(5))


# --------------------------------------------------------------------------------------------
# Heat maps: our additions, and the batch
# --------------------------------------------------------------------------------------------
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


def _state(init, uss, wss=None, protos=None):
    """A state after Step 1 whose M_init is ``init``."""
    state = new_state(None, np.zeros(0, np.int64), None, None, uss, wss, prototypes=protos)
    state.init = torch.as_tensor(init)
    state.init_counts = class_counts(state.init)
    state.classes = present_classes(state.init_counts)
    return state


def _heat(init, uss, wss, params, protos=None):
    state = _state(init, uss, wss, protos)
    rebalance_heat([state], params)
    return state.heat.numpy()


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


def test_the_posterior_support_takes_a_mislabelled_block_out_of_the_class_centroid():
    # M_init gives class 1 an 8 x 8 block of class 2's half (4 of its 28 cells): over M_init's
    # fractions its centroid is (24 e1 + 4 e2) / 28 (cos to e1 0.986); the block's cells look like
    # class 2 (cos 1 to e2 against 0.16 to class 1's centroid), so the posterior takes them out.
    _, init, _, uss = two_halves_scene()
    grid = uss.shape[1:]
    state = _state(init, uss)
    weights, cells = cell_fractions([state.init], [state.classes], [grid])
    support = grid_support([torch.as_tensor(uss)], [grid], weights, cells, [2], temperature=0.05, prior=0.1)
    e1 = torch.zeros(6, dtype=torch.float64)
    e1[0] = 1.0
    for w, floor, ceiling in ((weights, 0.97, 0.99), (support, 0.998, 1.0)):
        _, centroids = grid_heat_maps([torch.as_tensor(uss)], [grid], w, clip=1e-5)
        cosine = float(l2_normalise(centroids[0, 0], -1) @ e1)
        assert floor < cosine <= ceiling
    block = (slice(0, 2), slice(4, 6))  # the mislabelled block's cells
    assert float(support[0, 0].reshape(grid)[block].max()) < 1e-3 < float(weights[0, 0].reshape(grid)[block].min())


def test_a_high_temperature_without_prior_is_m_inits_support():
    # The posterior tends to 1 / G everywhere: every class's support is M_init's, scaled, and a
    # centroid is a weighted mean.
    init, uss, wss, protos = _scene()
    plain = _heat(init, uss, wss, PAPER, protos)
    flat = _heat(init, uss, wss, PAPER.replace(support_temperature=1e9, support_prior=0.0), protos)
    np.testing.assert_allclose(flat, plain, atol=1e-6)
    assert not np.allclose(_heat(init, uss, wss, PAPER.replace(support_temperature=0.05), protos), plain, atol=1e-3)


def test_size_passes_move_the_class_sizes_from_m_init_towards_the_features():
    # M_init gives class 1 three quarters of the image, the features one quarter: the final OT
    # keeps class 1 near M_init's share; each pass counts the previous answer instead.
    rng = np.random.default_rng(0)
    truth = np.full((32, 64), 2, np.uint8)
    truth[:, :16] = 1
    init = np.full((32, 64), 2, np.uint8)
    init[:, :48] = 1
    cells = truth[::4, ::4]
    uss = np.stack([cells == 1, cells == 2]).astype(np.float32) + rng.normal(0, 0.05, (2, 8, 16)).astype(np.float32)
    shares, right = [], []
    for passes in (0, 1, 2, 4):
        state = _state(init, uss)
        rebalance_heat([state], PAPER.replace(steps=Steps.row(5), size_passes=passes))
        answer = state.classes[resize(state.heat.float(), truth.shape).argmax(dim=0).numpy()]
        shares.append((answer == 1).mean())
        right.append((answer == truth).mean())
    assert shares[0] > 0.7 and all(a > b for a, b in zip(shares, shares[1:]))
    assert all(a < b for a, b in zip(right, right[1:]))


def test_size_passes_need_the_area_marginal(monkeypatch):
    init, uss, wss, protos = _scene()
    uniform = PAPER.replace(marginal_rebalance="uniform")
    plain = _heat(init, uss, wss, uniform)
    # the uniform marginal counts no pixels: no pass runs (the answer is never counted)
    with monkeypatch.context() as m:
        m.setattr(stage, "answer_counts", lambda *a, **k: pytest.fail("a size pass ran without the area marginal"))
        np.testing.assert_array_equal(_heat(init, uss, wss, uniform.replace(size_passes=3)), plain)
    assert not np.array_equal(_heat(init, uss, wss, PAPER.replace(size_passes=1)), _heat(init, uss, wss, PAPER))


def test_heat_maps_of_maps_of_several_shapes_equal_each_image_alone():
    rng = np.random.default_rng(8)
    masks = [torch.as_tensor(rng.integers(0, 3, (24, 32)).astype(np.uint8)) for _ in range(3)]
    grids = [(6, 8), (6, 8), (4, 4)]
    maps = [torch.as_tensor(rng.normal(size=(5, 3, 4))), torch.as_tensor(rng.normal(size=(5, 3, 4))),
            torch.as_tensor(rng.normal(size=(5, 4, 4)))]  # two images share shapes: one group
    rows = [rng.normal(size=(3, 5)), None, rng.normal(size=(3, 5))]
    weights, _ = cell_fractions(masks, [np.arange(3)] * 3, grids)
    heat, centroids = grid_heat_maps(maps, grids, weights, clip=1e-5, prototype_rows=rows, weight=0.5)
    for b in range(3):
        n = grids[b][0] * grids[b][1]
        alone, alone_centroids = grid_heat_maps([maps[b]], [grids[b]], weights[b : b + 1, :, :n], clip=1e-5,
                                                prototype_rows=[rows[b]], weight=0.5)
        torch.testing.assert_close(heat[b, :, :n], alone[0], atol=1e-14, rtol=0)
        # centroids matter by direction only (cosines, correlations): a blended one is a unit vector
        torch.testing.assert_close(l2_normalise(centroids[b], -1), l2_normalise(alone_centroids[0], -1), atol=1e-14, rtol=0)
        assert float(heat[b, :, n:].abs().sum()) == 0


# --------------------------------------------------------------------------------------------
# The vanished-class guard (ours)
# --------------------------------------------------------------------------------------------
CLASSES = torch.tensor([1, 2, 3])


def _masks():
    """M_init: class 1 everywhere but a 2 x 2 block of class 2 (4 of 64 pixels) and a 4 x 8
    band of class 3 (32 pixels). M_dh kept 1 pixel of class 2 and all of class 3 but 8 pixels."""
    init = torch.ones(8, 8, dtype=torch.uint8)
    init[0:2, 0:2] = 2
    init[4:8, :] = 3
    mask = init.clone()
    mask[0, 1] = mask[1, 0] = mask[1, 1] = 1  # class 2 keeps 1 of 4 pixels (25 %)
    mask[4, :] = 1  # class 3 keeps 24 of 32 (75 %)
    return init, mask


def test_guard_restores_a_class_that_kept_less_than_the_ratio():
    init, mask = _masks()
    before = mask.clone()
    out = guard_vanished(mask, init, CLASSES, 0.5)
    assert bool((out[init == 2] == 2).all())  # 25 % < 50 %: restored
    assert bool((out[4] == 1).all())  # class 3 kept 75 % >= 50 %: left as M_dh has it
    assert torch.equal(mask, before)  # the argument is not mutated


def test_guard_ratio_boundary_is_strict():
    init, mask = _masks()
    # class 2 kept exactly 25 %: a ratio of 0.25 does not restore it, 0.26 does
    assert int((guard_vanished(mask, init, CLASSES, 0.25)[init == 2] == 2).sum()) == 1
    assert int((guard_vanished(mask, init, CLASSES, 0.26)[init == 2] == 2).sum()) == 4


def test_guard_max_share_protects_only_minor_classes():
    init, mask = _masks()
    # class 2 holds 4/64 = 6.25 % of the pixels, class 3 50 %; at ratio 0.8 both vanished
    everything = guard_vanished(mask, init, CLASSES, 0.8)
    assert bool((everything[init == 3] == 3).all()) and bool((everything[init == 2] == 2).all())
    minor = guard_vanished(mask, init, CLASSES, 0.8, max_share=0.1)
    assert bool((minor[init == 2] == 2).all()) and bool((minor[4] == 1).all())  # class 3 is not minor


def _support():
    """Heat maps of classes 1, 2, 3: class 2's reaches 0.3 on the top row of its block only (0.3
    exactly at (0, 1)), 0.1 elsewhere; class 3's is 0.9 everywhere."""
    heat = torch.full((3, 8, 8), 0.1, dtype=torch.float64)
    heat[1, 0, 0], heat[1, 0, 1] = 0.9, 0.3
    heat[2] = 0.9
    return heat


def test_guard_support_restores_only_where_the_class_heat_reaches_it():
    init, mask = _masks()
    out = guard_vanished(mask, init, CLASSES, 0.5, support=_support(), threshold=0.3)
    assert out[0, 0] == 2 and out[0, 1] == 2  # >= the threshold (0.3 itself included): given back
    assert out[1, 0] == 1 and out[1, 1] == 1  # below it: left as M_dh has them
    assert bool((out[4] == 1).all())  # class 3 was not guarded, whatever its heat


def test_guard_support_zero_gives_back_the_whole_region():
    init, mask = _masks()
    whole = guard_vanished(mask, init, CLASSES, 0.5, support=_support(), threshold=0.0)
    assert torch.equal(whole, guard_vanished(mask, init, CLASSES, 0.5)) and bool((whole[init == 2] == 2).all())


def test_guard_ignores_ignore_pixels_in_the_share():
    init, mask = _masks()
    init[2:4, :] = 255  # 16 ignore pixels: class 2 is now 4/48 = 8.3 % of the labelled ones
    mask[2:4, :] = 1
    assert int((guard_vanished(mask, init, CLASSES, 0.5, max_share=0.08)[init == 2] == 2).sum()) == 1
    assert int((guard_vanished(mask, init, CLASSES, 0.5, max_share=0.09)[init == 2] == 2).sum()) == 4


def test_guard_zero_is_the_papers_step_3(monkeypatch):
    rng = np.random.default_rng(0)
    init = np.zeros((12, 16), dtype=np.uint8)
    init[:, 8:] = 1
    uss = rng.normal(size=(4, 3, 4)).astype(np.float32)
    paper = _row(5, guard=0.0)
    off = rebalance(init, uss=uss, wss=None, params=paper).mask
    on = rebalance(init, uss=uss, wss=None, params=_row(5, guard=1.0, guard_support=0.0)).mask
    # with guard 1.0 (whole regions) every class whose M_init region changed at all gets it back ...
    assert (on == init).all() and not (off == init).all()  # ... and in this scene Step 3 changed some
    monkeypatch.setattr(stage, "guard_vanished", lambda *a, **k: pytest.fail("guard 0 must not run the guard"))
    np.testing.assert_array_equal(rebalance(init, uss=uss, wss=None, params=paper).mask, off)


def test_guard_parameters_are_checked():
    with pytest.raises(ValueError, match="guard"):
        DHRParams(guard=1.5)
    with pytest.raises(ValueError, match="guard max share"):
        DHRParams(guard_max_share=0.0)


def _stripe_state():
    """A red stripe (class 1, columns 10-11) on grey (class 2); H on a 4 x 8 grid gives class 1
    the whole cell column 2 (pixels 8-11), so upsampled it spreads over grey pixels around it."""
    image = np.full((16, 32, 3), 128, dtype=np.uint8)
    image[:, 10:12] = (200, 30, 30)
    truth = np.full((16, 32), 2, dtype=np.uint8)
    truth[:, 10:12] = 1
    heat = np.zeros((2, 4, 8))
    heat[0, :, 2] = 1.0
    heat[1] = 0.6
    state = _state(truth, None)
    state.image, state.heat = torch.as_tensor(image), torch.as_tensor(heat)
    return state, truth


def test_the_colour_posterior_takes_back_what_the_upsampling_spread():
    wrong = []
    for weight in (0.0, 0.5, 1.0):
        state, truth = _stripe_state()
        stage.final_mask([state], PAPER.replace(colour_weight=weight), None)  # no CRF: the argmax
        wrong.append(int((state.mask.numpy() != truth).sum()))
    # heat alone: class 1's upsampled heat (1 - |x_src - 2|, x_src = (x + 0.5) / 4 - 0.5) beats 0.6 on
    # columns 8-11, two grey columns too; colour alone: exactly the stripe
    assert wrong == [2 * 16, 0, 0]


def test_the_colour_posterior_needs_the_image():
    state, _ = _stripe_state()
    state.image = None  # Steps 2-3 alone (dhr.rebalance): nothing to pool colours from
    stage.final_mask([state], PAPER.replace(colour_weight=1.0), None)
    alone, _ = _stripe_state()
    stage.final_mask([alone], PAPER, None)
    assert torch.equal(state.mask, alone.mask)
