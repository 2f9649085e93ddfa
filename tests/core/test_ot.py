"""f_OT (Eq. 2): Sinkhorn marginals, the log-domain path, POT agreement, hand-solved 2 x 2 plans."""
import warnings

import numpy as np
import ot as pot
import pytest

from dhr_label.core.cap import minmax
from dhr_label.core.ot import OTConvergenceWarning, f_ot, sinkhorn

TOL = 1e-5  # sinkhorn's default tol: L1 error of the cell marginal
COL_ATOL = 1e-6  # the class marginal is exact after its update, up to float32 rounding


def test_uniform_marginals_are_met():
    scores = np.random.default_rng(0).uniform(0, 1, (50, 4)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OTConvergenceWarning)
        res = sinkhorn(scores, eps=0.1)
    assert res.converged and not res.log_domain
    assert res.plan.shape == (50, 4)
    assert np.abs(res.plan.sum(axis=1) - 1 / 50).sum() < TOL
    np.testing.assert_allclose(res.plan.sum(axis=0), 1 / 4, atol=COL_ATOL)


def test_given_class_marginal_is_met_and_normalised():
    scores = np.random.default_rng(1).uniform(0, 1, (40, 4)).astype(np.float32)
    v = np.array([0.1, 0.2, 0.3, 0.4])
    res = sinkhorn(scores, eps=0.1, col_marginal=v)
    assert np.abs(res.plan.sum(axis=1) - 1 / 40).sum() < TOL
    np.testing.assert_allclose(res.plan.sum(axis=0), v, atol=COL_ATOL)
    # Unnormalised weights mean the same marginal.
    res10 = sinkhorn(scores, eps=0.1, col_marginal=10 * v)
    np.testing.assert_allclose(res10.plan, res.plan, atol=1e-7)


def test_single_class_gives_all_ones():
    scores = np.random.default_rng(2).uniform(0, 1, (7, 1))
    out = f_ot(scores)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.ones((7, 1), dtype=np.float32))


def test_wide_score_range_takes_the_log_domain_and_stays_finite():
    # Cost range 30 at eps 0.1 is exp(-300): zero in float32 (and float64 past ~745).
    scores = np.random.default_rng(3).uniform(0, 30, (40, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow/underflow or convergence warnings either
        res = sinkhorn(scores, eps=0.1)
    assert res.log_domain and res.converged
    assert np.isfinite(res.plan).all()
    assert np.abs(res.plan.sum(axis=1) - 1 / 40).sum() < TOL
    np.testing.assert_allclose(res.plan.sum(axis=0), 1 / 3, atol=COL_ATOL)
    out = f_ot(scores)
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0


def test_unit_range_scores_take_the_plain_kernel():
    scores = np.random.default_rng(4).uniform(0, 1, (20, 3))
    assert not sinkhorn(scores, eps=0.1).log_domain


def test_agrees_with_pot_plain_path():
    scores = np.random.default_rng(5).uniform(0, 1, (30, 4))
    ours = sinkhorn(scores, eps=0.1, tol=1e-9).plan
    theirs = pot.sinkhorn(np.full(30, 1 / 30), np.full(4, 1 / 4), 1.0 - scores, 0.1, stopThr=1e-12, numItermax=10000)
    # Plan entries are ~1/120; float32 kernel rounding bounds the difference.
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-7)


def test_agrees_with_pot_log_domain_path_and_class_marginal():
    rng = np.random.default_rng(6)
    scores = rng.uniform(0, 12, (25, 3))
    v = np.array([0.5, 0.3, 0.2])
    res = sinkhorn(scores, eps=0.1, col_marginal=v, tol=1e-9, max_iter=20000)
    assert res.log_domain
    theirs = pot.sinkhorn(
        np.full(25, 1 / 25), v, 1.0 - scores, 0.1, method="sinkhorn_log", stopThr=1e-12, numItermax=20000
    )
    np.testing.assert_allclose(res.plan, theirs, rtol=1e-4, atol=1e-8)


def test_non_convergence_warns():
    scores = np.random.default_rng(7).uniform(0, 1, (30, 4))
    with pytest.warns(OTConvergenceWarning, match="did not converge"):
        res = sinkhorn(scores, eps=0.1, max_iter=1)
    assert not res.converged and res.iterations == 1
    assert res.error >= 1e-5


def test_hand_computed_2x2_uniform():
    # Cost [[0, 1], [1, 0]], eps 0.1: by symmetry T = x^2 [[1, g], [g, 1]] with g = exp(-10),
    # rows 1/2 give x^2 (1 + g) = 1/2.
    g = np.exp(-10.0)
    a = 1 / (2 * (1 + g))
    res = sinkhorn(np.eye(2, dtype=np.float32), eps=0.1)
    np.testing.assert_allclose(res.plan, [[a, a * g], [a * g, a]], rtol=1e-6, atol=1e-9)
    # Min-max per class of that plan: the identity.
    np.testing.assert_allclose(f_ot(np.eye(2)), np.eye(2), atol=1e-6)


def test_hand_computed_2x2_with_class_marginal():
    # Rows 1/2, columns (0.3, 0.7): T = [[p, .5-p], [.3-p, .2+p]], and the entropic optimum has
    # T11 T22 / (T12 T21) = exp((C12 + C21 - C11 - C22) / eps) = exp(20) =: k, so
    # (1 - k) p^2 + (0.2 + 0.8 k) p - 0.15 k = 0, with the root in (0, 0.3).
    k = np.exp(20.0)
    roots = np.roots([1 - k, 0.2 + 0.8 * k, -0.15 * k]).real
    p = roots[(roots > 0) & (roots < 0.3)].item()
    expected = np.array([[p, 0.5 - p], [0.3 - p, 0.2 + p]])
    res = sinkhorn(np.eye(2), eps=0.1, col_marginal=np.array([0.3, 0.7]), tol=1e-6)
    assert res.converged
    np.testing.assert_allclose(res.plan, expected, atol=2e-7)  # float32 plan


def test_unbalanced_meets_the_cell_marginal_and_relaxes_the_class_one():
    scores = np.random.default_rng(8).uniform(0, 1, (30, 4))
    scores[:, 0] += 0.5  # class 0 is everyone's favourite
    res = sinkhorn(scores, eps=0.1, kl_weight=0.1)
    assert res.converged
    assert np.abs(res.plan.sum(axis=1) - 1 / 30).sum() < TOL
    cols = res.plan.sum(axis=0)
    assert cols[0] > 0.25 + 0.05  # relaxed: the favourite takes more than its 1/4
    # A huge KL weight is the balanced problem again.
    stiff = sinkhorn(scores, eps=0.1, kl_weight=1e7, tol=1e-8).plan
    balanced = sinkhorn(scores, eps=0.1, tol=1e-8).plan
    np.testing.assert_allclose(stiff, balanced, atol=1e-6)


def test_f_ot_columns_span_zero_to_one():
    scores = np.random.default_rng(9).uniform(0, 1, (60, 5))
    out = f_ot(scores)
    assert out.shape == (60, 5) and out.dtype == np.float32
    np.testing.assert_allclose(out.min(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(out.max(axis=0), 1.0, atol=1e-6)


def test_minmax_along_axis_0_known_values_and_clip():
    values = np.array([[1.0, 2.0, 0.0], [3.0, 2.0, 4e-6], [5.0, 2.0, 2e-6]])
    out = minmax(values, 0)
    np.testing.assert_allclose(out[:, 0], [0.0, 0.5, 1.0], atol=1e-7)
    np.testing.assert_array_equal(out[:, 1], 0.0)  # flat column: 0, not NaN
    # span 4e-6 < clip 1e-5: divided by the clip, so it stops short of 1.
    np.testing.assert_allclose(out[:, 2], [0.0, 0.4, 0.2], atol=1e-6)
    assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize(
    "scores, kwargs, match",
    [
        (np.zeros(3), {}, "N x K"),
        (np.array([[0.0, np.nan]]), {}, "finite"),
        (np.zeros((3, 2)), {"col_marginal": np.array([1.0, 0.0])}, "positive"),
        (np.zeros((3, 2)), {"col_marginal": np.array([1.0, 1.0, 1.0])}, "2 positive"),
    ],
)
def test_bad_scores_are_refused(scores, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sinkhorn(scores, **kwargs)
