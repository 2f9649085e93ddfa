"""f_OT (Eq. 2): Sinkhorn's marginals, the log domain, POT's plans, hand-solved 2 x 2 plans, and
the batch: a problem gives the same plan, stopping at the same iteration, alone or padded among
others."""
import warnings

import numpy as np
import ot as pot
import pytest
import torch

from dhr_label.core.ot import Transport, sinkhorn, transport
from dhr_label.core.tensors import WORK, length_mask, pad_stack
from dhr_label.params import OTParams

TOL = 1e-5  # sinkhorn's default tol: L1 error of the cell marginal
COL_ATOL = 1e-12  # the class marginal is exact after its update, up to float64 rounding


def f_ot(scores, params=OTParams(), marginal=None):
    """f_OT of one N x K problem, as the stages call it (through transport): N x K in [0, 1]."""
    scores = torch.as_tensor(scores, dtype=WORK)
    (values,), (note,) = transport([scores.T], [Transport(np.arange(scores.shape[1]), marginal, False)], params, 0.1)
    return values.T, note


def one(scores, **kwargs):
    """Sinkhorn of one N x K problem (a batch of one)."""
    result = sinkhorn(torch.as_tensor(scores, dtype=WORK)[None], **kwargs)
    return result, result.plan[0].numpy()


def padded(arrays, device="cpu"):
    values, shapes = pad_stack(arrays, device)
    rows = length_mask([s[0] for s in shapes], values.shape[1], device)
    cols = length_mask([s[1] for s in shapes], values.shape[2], device)
    return values, rows, cols


def test_uniform_marginals_are_met():
    res, plan = one(np.random.default_rng(0).uniform(0, 1, (50, 4)))
    assert bool(res.converged[0]) and not bool(res.log_domain[0])
    assert np.abs(plan.sum(axis=1) - 1 / 50).sum() < TOL
    np.testing.assert_allclose(plan.sum(axis=0), 1 / 4, atol=COL_ATOL)


def test_given_class_marginal_is_met_and_normalised():
    scores = np.random.default_rng(1).uniform(0, 1, (40, 4))
    v = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=WORK)
    _, plan = one(scores, col_marginal=v)
    assert np.abs(plan.sum(axis=1) - 1 / 40).sum() < TOL
    np.testing.assert_allclose(plan.sum(axis=0), v[0].numpy(), atol=COL_ATOL)
    _, plan10 = one(scores, col_marginal=10 * v)  # unnormalised weights: the same marginal
    np.testing.assert_allclose(plan10, plan, atol=1e-15)


def test_wide_score_range_takes_the_log_domain_and_stays_finite():
    # Cost range 30 at eps 0.1 is exp(-300): zero in float32 (and float64 past ~745).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res, plan = one(np.random.default_rng(3).uniform(0, 30, (40, 3)))
    assert bool(res.log_domain[0]) and bool(res.converged[0])
    assert np.isfinite(plan).all() and np.abs(plan.sum(axis=1) - 1 / 40).sum() < TOL
    np.testing.assert_allclose(plan.sum(axis=0), 1 / 3, atol=1e-9)


def test_agrees_with_pot_plain_path():
    scores = np.random.default_rng(5).uniform(0, 1, (30, 4))
    _, ours = one(scores, tol=1e-12, max_iter=10000)
    theirs = pot.sinkhorn(np.full(30, 1 / 30), np.full(4, 1 / 4), 1.0 - scores, 0.1, stopThr=1e-14, numItermax=10000)
    np.testing.assert_allclose(ours, theirs, rtol=1e-8, atol=1e-12)


def test_agrees_with_pot_log_domain_path_and_class_marginal():
    rng = np.random.default_rng(6)
    scores = rng.uniform(0, 12, (25, 3))
    v = np.array([0.5, 0.3, 0.2])
    res, ours = one(scores, col_marginal=torch.as_tensor(v)[None], tol=1e-12, max_iter=20000)
    assert bool(res.log_domain[0])
    theirs = pot.sinkhorn(np.full(25, 1 / 25), v, 1.0 - scores, 0.1, method="sinkhorn_log", stopThr=1e-14, numItermax=20000)
    np.testing.assert_allclose(ours, theirs, rtol=1e-8, atol=1e-14)


def test_hand_computed_2x2_uniform():
    # Cost [[0, 1], [1, 0]], eps 0.1: by symmetry T = x^2 [[1, g], [g, 1]] with g = exp(-10),
    # rows 1/2 give x^2 (1 + g) = 1/2.
    g = np.exp(-10.0)
    a = 1 / (2 * (1 + g))
    _, plan = one(np.eye(2))
    np.testing.assert_allclose(plan, [[a, a * g], [a * g, a]], rtol=1e-12)
    np.testing.assert_allclose(f_ot(np.eye(2))[0].numpy(), np.eye(2), atol=1e-12)  # min-max per class


def test_hand_computed_2x2_with_class_marginal():
    # Rows 1/2, columns (0.3, 0.7): T = [[p, .5-p], [.3-p, .2+p]], and the entropic optimum has
    # T11 T22 / (T12 T21) = exp((C12 + C21 - C11 - C22) / eps) = exp(20) =: k, so
    # (1 - k) p^2 + (0.2 + 0.8 k) p - 0.15 k = 0, with the root in (0, 0.3).
    k = np.exp(20.0)
    roots = np.roots([1 - k, 0.2 + 0.8 * k, -0.15 * k]).real
    p = roots[(roots > 0) & (roots < 0.3)].item()
    res, plan = one(np.eye(2), col_marginal=torch.tensor([[0.3, 0.7]], dtype=WORK), tol=1e-12)
    assert bool(res.converged[0])
    np.testing.assert_allclose(plan, [[p, 0.5 - p], [0.3 - p, 0.2 + p]], atol=1e-12)


def test_unbalanced_meets_the_cell_marginal_and_relaxes_the_class_one():
    scores = np.random.default_rng(8).uniform(0, 1, (30, 4))
    scores[:, 0] += 0.5  # class 0 is everyone's favourite
    res, plan = one(scores, kl_weight=0.1)
    assert bool(res.converged[0]) and np.abs(plan.sum(axis=1) - 1 / 30).sum() < TOL
    assert plan.sum(axis=0)[0] > 0.25 + 0.05  # relaxed: the favourite takes more than its 1/4
    _, stiff = one(scores, kl_weight=1e7, tol=1e-10)  # a huge KL weight is the balanced problem again
    _, balanced = one(scores, tol=1e-10)
    np.testing.assert_allclose(stiff, balanced, atol=1e-7)


def test_stopping_at_max_iter_is_reported():
    res, _ = one(np.random.default_rng(7).uniform(0, 1, (30, 4)), max_iter=1)
    assert not bool(res.converged[0]) and int(res.iterations[0]) == 1 and float(res.error[0]) >= 1e-5
    _, note = f_ot(np.random.default_rng(7).uniform(0, 1, (30, 4)), OTParams(max_iter=1))
    assert note.startswith("OTConvergenceWarning: Sinkhorn did not converge: marginal error") and note.endswith("after 1 iterations")


SHAPES = [(50, 4), (30, 2), (64, 7), (10, 1), (3, 3)]


@pytest.mark.parametrize("kl_weight", [None, 0.1])
def test_a_problem_gives_the_same_plan_alone_or_padded_in_a_batch(kl_weight):
    rng = np.random.default_rng(0)
    scores = [rng.uniform(0, 1, shape) for shape in SHAPES]
    scores.append(rng.uniform(0, 30, (20, 3)))  # a log-domain problem among plain ones
    batch = sinkhorn(*padded(scores), kl_weight=kl_weight)
    for b, s in enumerate(scores):
        alone, plan = one(s, kl_weight=kl_weight)
        n, k = s.shape
        assert int(batch.iterations[b]) == int(alone.iterations[0])  # frozen at its own check
        assert bool(batch.log_domain[b]) == bool(alone.log_domain[0]) == (b == len(SHAPES))
        np.testing.assert_allclose(batch.plan[b, :n, :k].numpy(), plan, rtol=1e-12, atol=1e-15)
        assert float(batch.plan[b, n:].abs().sum()) == 0 and float(batch.plan[b, :, k:].abs().sum()) == 0


def test_how_often_the_host_checks_does_not_change_a_plan():
    scores = [np.random.default_rng(2).uniform(0, 1, s) for s in SHAPES[:3]]
    every, rarely = sinkhorn(*padded(scores), checks_per_sync=1), sinkhorn(*padded(scores), checks_per_sync=7)
    assert torch.equal(every.plan, rarely.plan) and torch.equal(every.iterations, rarely.iterations)


def test_transport_min_max_normalises_the_plans_and_notes_what_stopped_early():
    rng = np.random.default_rng(4)
    scores = [torch.as_tensor(rng.uniform(0, 1, (g, n)), dtype=WORK) for g, n in [(4, 50), (3, 20), (1, 9), (2, 6)]]
    calls = [Transport(np.arange(4), np.array([0.1, 0.2, 0.3, 0.4]), False), Transport(np.arange(3), None, True),
             Transport(np.arange(1), None, False), None]
    values, notes = transport(scores, calls, OTParams(), kl_weight=0.1)
    for value, score in zip(values[:2], scores[:2]):
        assert value.shape == score.shape
        np.testing.assert_allclose(value.amin(dim=1).numpy(), 0.0, atol=1e-12)  # per class over the cells
        np.testing.assert_allclose(value.amax(dim=1).numpy(), 1.0, atol=1e-12)
    assert torch.equal(values[2], torch.ones(1, 9, dtype=WORK)) and torch.equal(values[3], torch.ones(2, 6, dtype=WORK))
    assert notes == [None] * 4
    _, notes = transport(scores[:1], calls[:1], OTParams(max_iter=3), kl_weight=0.1)
    assert notes[0].startswith("OTConvergenceWarning: Sinkhorn did not converge") and "after 3 iterations" in notes[0]


def test_f_ot_of_one_class_is_all_ones_and_columns_span_zero_to_one():
    np.testing.assert_array_equal(f_ot(np.random.default_rng(2).uniform(0, 1, (7, 1)))[0].numpy(), np.ones((7, 1)))
    out = f_ot(np.random.default_rng(9).uniform(0, 1, (60, 5)))[0].numpy()
    assert out.shape == (60, 5)
    np.testing.assert_allclose(out.min(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(out.max(axis=0), 1.0, atol=1e-12)


@pytest.mark.parametrize(
    "scores, kwargs, match",
    [
        (torch.zeros(3, 2), {}, "B x N x K"),
        (torch.tensor([[[0.0, float("nan")]]]), {}, "finite"),
        (torch.zeros(1, 3, 2), {"col_marginal": torch.tensor([[1.0, 0.0]])}, "positive"),
    ],
)
def test_bad_scores_are_refused(scores, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sinkhorn(scores.to(WORK), **kwargs)
