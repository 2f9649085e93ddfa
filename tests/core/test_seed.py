"""Step 1 (Eq. 2): seed scores, the first CRF's channels, M_seed and the integration into M_base."""
import numpy as np
import pytest
import torch

from dhr_label.core.ot import Transport, transport
from dhr_label.core.pipeline import new_state, start
from dhr_label.core.seed import integrate, seed_channels, seed_mask, seed_scores
from dhr_label.params import DHRParams, OTParams, Steps

BG = 0


def _row(row: int, **changes) -> DHRParams:
    return DHRParams(steps=Steps.row(row), **changes)


def scores_of(cam, params, labels):
    state = start(new_state(cam, np.asarray(labels), np.zeros((2, 2, 3), np.uint8), None), params)
    seed_scores([state], params)
    return state.scores.numpy()


def test_seed_scores_relu_and_max_normalisation_without_ot():
    cam = np.array([[[-1.0, 2.0], [4.0, 0.0]], [[-3.0, -1.0], [-2.0, -0.5]]], dtype=np.float32)
    before = cam.copy()
    out = scores_of(cam, _row(3), [1, 2])
    assert out[0].tolist() == [[0.0, 0.5], [1.0, 0.0]]
    assert out[1].tolist() == [[0.0, 0.0], [0.0, 0.0]]  # all negative: 0, not NaN
    np.testing.assert_array_equal(cam, before)


def test_seed_scores_with_ot_multiply_by_f_ot():
    cam = np.random.default_rng(0).uniform(0, 2, (3, 4, 5)).astype(np.float32)
    normalised = cam.astype(np.float64) / cam.reshape(3, -1).max(axis=1)[:, None, None]
    cells = normalised.reshape(3, -1).T
    (plan,), _ = transport([torch.as_tensor(cells.T)], [Transport(np.arange(3), None, False)], OTParams(), 0.1)
    expected = (cells * plan.T.numpy()).T.reshape(3, 4, 5)
    np.testing.assert_allclose(scores_of(cam, _row(4), [1, 2, 3]), expected, atol=1e-12)
    # A single tag has nothing to transport: the normalised CAM itself.
    np.testing.assert_allclose(scores_of(cam[:1], _row(4), [1]), normalised[:1], atol=1e-15)


def test_seed_scores_of_a_batch_equal_each_image_alone():
    rng = np.random.default_rng(1)
    cams = [rng.uniform(-1, 2, shape).astype(np.float32) for shape in [(3, 4, 5), (2, 6, 3), (1, 2, 2)]]
    params = _row(4)
    states = [start(new_state(c, np.arange(1, len(c) + 1), np.zeros((2, 2, 3), np.uint8), None), params) for c in cams]
    seed_scores(states, params)
    for cam, state in zip(cams, states):
        np.testing.assert_allclose(state.scores.numpy(), scores_of(cam, params, np.arange(1, len(cam) + 1)), rtol=1e-12, atol=1e-15)


def test_seed_channels_background_score_and_gamma():
    scores = torch.tensor([[[0.9, 0.4, 0.2]]], dtype=torch.float64)  # one tag, 1 x 3, no resize
    probs, ids = seed_channels(scores, np.array([3]), BG, (1, 3), 1.0)
    assert probs.dtype == torch.float32 and ids.tolist() == [BG, 3]
    np.testing.assert_allclose(probs.numpy(), [[[0.1, 0.6, 0.8]], [[0.9, 0.4, 0.2]]], atol=1e-7)
    probs, _ = seed_channels(scores, np.array([3]), BG, (1, 3), 2.0)
    np.testing.assert_allclose(probs[0].numpy(), [[0.01, 0.36, 0.64]], atol=1e-7)
    probs, ids = seed_channels(scores, np.array([3]), None, (2, 6), 1.0)  # no background: the tags alone, upsampled
    assert ids.tolist() == [3] and probs.shape == (1, 2, 6)


def _seed(scores, labels, background, params, image_width=3):
    state = new_state(np.zeros((len(labels), 1, 1), np.float32), np.array(labels), np.zeros((1, image_width, 3), np.uint8), None,
                      background=background)
    state.scores = torch.as_tensor(scores, dtype=torch.float64)
    seed_mask([state], params, None)
    return state


def test_seed_mask_without_crf_is_the_argmax_as_class_ids():
    scores = np.array([[[0.9, 0.4, 0.2]]])
    assert _seed(scores, [3], BG, _row(2)).seed.tolist() == [[3, 0, 0]]  # bg 0.1, 0.6, 0.8
    assert _seed(scores, [3], BG, _row(2, gamma=2.0)).seed.tolist() == [[3, 3, 0]]  # bg 0.01, 0.36, 0.64
    state = _seed(np.array([[[0.9, 0.4, 0.2]], [[0.1, 0.5, 0.3]]]), [4, 9], None, _row(2))
    assert state.seed.dtype == torch.uint8 and state.seed.tolist() == [[4, 9, 9]]
    assert state.init.tolist() == [[4, 9, 9]] and state.restored == []  # no base mask: M_init is the seed
    assert state.init_counts[4] == 1 and state.init_counts[9] == 2 and state.init_counts.sum() == 3


def _integrate(seed, base, tags, rho):
    init, lost = integrate(torch.tensor(seed, dtype=torch.uint8), None if base is None else torch.tensor(base, dtype=torch.uint8),
                           torch.tensor(tags), rho)
    return init.tolist(), np.asarray(tags)[lost.numpy()].tolist()


def test_integrate_restores_a_lost_tag_from_the_seed():
    base = torch.tensor([[3, 7, 0], [0, 255, 0]], dtype=torch.uint8)  # 1 of 4 seed pixels kept
    before = base.clone()
    init, lost = integrate(torch.tensor([[3, 3, 0], [3, 3, 0]], dtype=torch.uint8), base, torch.tensor([3]), 0.5)
    assert init.tolist() == [[3, 3, 0], [3, 3, 0]] and lost.tolist() == [True]
    assert torch.equal(base, before)


def test_integrate_leaves_a_kept_tag_and_the_background_untouched():
    base = [[5, 5, 5, 0], [5, 0, 5, 5]]  # 3 of 4 kept, more of 5 elsewhere
    assert _integrate([[5, 5, 0, 0], [5, 5, 0, 0]], base, [5], 0.5) == (base, [])


@pytest.mark.parametrize("rho, restored", [(0.5, False), (0.51, True), (0.0, False), (1.0, True)])
def test_integrate_rho_boundary(rho, restored):
    # Seed region of 4 pixels, 2 of them kept by the base: lost iff 2 < rho * 4.
    seed, base = [[3, 3, 3, 3]], [[3, 3, 0, 0]]
    assert _integrate(seed, base, [3], rho) == ((seed, [3]) if restored else (base, []))


def test_integrate_without_base_is_a_copy_of_the_seed_and_ignores_absent_tags():
    seed = torch.tensor([[3, 0]], dtype=torch.uint8)
    init, lost = integrate(seed, None, torch.tensor([3]), 0.5)
    assert torch.equal(init, seed) and init is not seed and lost.tolist() == [False]
    assert _integrate([[3, 0]], [[0, 0]], [5], 0.5) == ([[0, 0]], [])  # tag 5 not in the seed
