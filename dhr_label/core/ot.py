"""Entropic optimal transport between feature cells and classes: f_OT of the paper's Eq. 2."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

from ..params import OTParams
from .cap import minmax

# exp(-x) stays a normal float32 for x below ~87; past this the plain kernel is unsafe.
_LOG_DOMAIN_RANGE = 80.0


class OTConvergenceWarning(RuntimeWarning):
    """Sinkhorn reached ``max_iter`` before its marginal error fell below ``tol``."""


@dataclass(frozen=True)
class SinkhornResult:
    """The transport plan ``plan`` (N x K, total mass 1) and how the iterations went."""

    plan: np.ndarray
    iterations: int
    error: float
    converged: bool
    log_domain: bool


def sinkhorn(
    scores: np.ndarray,
    *,
    eps: float = OTParams.eps,
    col_marginal: np.ndarray | None = None,
    kl_weight: float | None = None,
    tol: float = OTParams.tol,
    max_iter: int = OTParams.max_iter,
    check_every: int = OTParams.check_every,
) -> SinkhornResult:
    """Entropic OT plan for the cost ``1 - scores``.

    Parameters
    ----------
    scores : ndarray, shape (N, K)
        Similarity of each of N cells to each of K classes (finite; usually in [0, 1]).
    eps : float
        Entropic regularisation.
    col_marginal : ndarray, shape (K,), optional
        Class marginal ``v`` (positive, sums to 1); uniform ``1/K`` when omitted. The cell
        marginal ``u`` is always uniform, ``1/N``.
    kl_weight : float, optional
        When given, the class marginal is KL-relaxed (unbalanced OT):
        ``c <- (v / (G^T r)) ** (w / (w + eps))``.
    tol : float
        Stop when the L1 error of the cell marginal, checked every ``check_every``
        iterations, is below ``tol`` (with the class update just done, the balanced class
        marginal is exact, so this is the whole marginal error).
    max_iter : int
        Iteration cap; reaching it emits :class:`OTConvergenceWarning`.

    Returns
    -------
    SinkhornResult
        ``plan = diag(r) G diag(c)`` with ``G = exp(-(1 - S) / eps)``.

    Notes
    -----
    Each row of the cost is shifted by its minimum before exponentiating (absorbed by ``r``),
    so no row underflows; where the remaining cost range over ``eps`` exceeds what float32
    ``exp`` represents, the iterations run in the log domain (float64).

    Examples
    --------
    >>> s = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    >>> res = sinkhorn(s, eps=0.1)
    >>> np.allclose(res.plan.sum(axis=1), 0.5, atol=1e-5), np.allclose(res.plan.sum(axis=0), 0.5, atol=1e-5)
    (True, True)
    """
    scores = np.asarray(scores)
    if scores.ndim != 2 or min(scores.shape) < 1:
        raise ValueError(f"scores must be N x K with N, K >= 1, got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    n, k = scores.shape
    if col_marginal is None:
        v = np.full(k, 1.0 / k)
    else:
        v = np.asarray(col_marginal, dtype=np.float64)
        if v.shape != (k,) or (v <= 0).any():
            raise ValueError(f"col_marginal must be {k} positive values, got {v}")
        v = v / v.sum()
    cost = 1.0 - scores.astype(np.float64)
    cost -= cost.min(axis=1, keepdims=True)
    power = 1.0 if kl_weight is None else kl_weight / (kl_weight + eps)
    if cost.max() / eps > _LOG_DOMAIN_RANGE:
        return _sinkhorn_log(cost, v, eps, power, tol, max_iter, check_every)
    return _sinkhorn_plain(cost, v, eps, power, tol, max_iter, check_every)


def _sinkhorn_plain(cost, v, eps, power, tol, max_iter, check_every) -> SinkhornResult:
    n, k = cost.shape
    kernel = np.exp(-cost / eps).astype(np.float32)
    u32 = np.float32(1.0 / n)
    v32 = v.astype(np.float32)
    c = np.ones(k, dtype=np.float32)
    error = np.inf
    it = 0
    while it < max_iter:
        it += 1
        r = u32 / (kernel @ c)
        c = v32 / (r @ kernel)
        if power != 1.0:
            c = c**power
        if it % check_every == 0 or it == max_iter:
            error = float(np.abs(r * (kernel @ c) - u32).sum())
            if error < tol:
                break
    plan = (r[:, None] * kernel) * c[None, :]
    return _finish(plan, it, error, tol, log_domain=False)


def _sinkhorn_log(cost, v, eps, power, tol, max_iter, check_every) -> SinkhornResult:
    n, k = cost.shape
    log_u = np.full(n, -np.log(n))
    log_v = np.log(v)
    neg = -cost / eps
    f = np.zeros(n)
    g = np.zeros(k)
    error = np.inf
    it = 0
    while it < max_iter:
        it += 1
        f = log_u - logsumexp(neg + g[None, :], axis=1)
        g = log_v - logsumexp(neg + f[:, None], axis=0)
        if power != 1.0:
            g = g * power
        if it % check_every == 0 or it == max_iter:
            rows = np.exp(f + logsumexp(neg + g[None, :], axis=1))
            error = float(np.abs(rows - 1.0 / n).sum())
            if error < tol:
                break
    plan = np.exp(neg + f[:, None] + g[None, :]).astype(np.float32)
    return _finish(plan, it, error, tol, log_domain=True)


def _finish(plan, iterations, error, tol, *, log_domain) -> SinkhornResult:
    converged = bool(error < tol)
    if not converged:
        warnings.warn(
            f"Sinkhorn did not converge: marginal error {error:.2e} >= tol {tol:.0e} "
            f"after {iterations} iterations",
            OTConvergenceWarning,
            stacklevel=3,
        )
    return SinkhornResult(plan, iterations, error, converged, log_domain)


def f_ot(
    scores: np.ndarray,
    params: OTParams = OTParams(),
    *,
    col_marginal: np.ndarray | None = None,
    kl_weight: float | None = None,
) -> np.ndarray:
    """f_OT(S) of Eq. 2: the converged plan for cost ``1 - S``, min-max normalised per class.

    Parameters
    ----------
    scores : ndarray, shape (N, K)
        Cell-to-class scores.
    params : OTParams
        ``eps``, ``tol``, ``max_iter``, ``check_every`` of :func:`sinkhorn`, and the
        denominator clip of the per-class min-max.
    col_marginal, kl_weight
        The class marginal and its KL relaxation, as :func:`sinkhorn`.

    Returns
    -------
    ndarray, shape (N, K), float32, values in [0, 1]
        All ones when K = 1 (nothing to transport). Callers use ``S * f_ot(S)``.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be N x K, got shape {scores.shape}")
    if scores.shape[1] == 1:
        return np.ones(scores.shape, dtype=np.float32)
    plan = sinkhorn(
        scores, eps=params.eps, col_marginal=col_marginal, kl_weight=kl_weight,
        tol=params.tol, max_iter=params.max_iter, check_every=params.check_every,
    ).plan
    return minmax(plan, 0, params.minmax_clip)
