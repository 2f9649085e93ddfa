"""Entropic optimal transport between feature cells and classes: f_OT of the paper's Eq. 2.

One Sinkhorn for every caller: B problems at once that differ in cells N and classes K, padded
into one tensor with boolean masks of what is real (``rows``: cells, ``cols``: classes), so
padding never reaches a minimum, a maximum or a marginal. A CPU worker solves a batch of one,
the device executor a batch of many; the same problem gives the same plan in either.

Each problem stops at its own iteration: a converged problem is frozen in place while the others
go on, and the host learns whether any problem still runs without waiting on the device at
every check (on CUDA the flag is copied to pinned memory behind the work and read once it has
landed), so an image's plan does not depend on its batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..params import OTParams
from .cap import minmax
from .tensors import WORK, length_mask, pad_stack, to_device, to_host

#: exp(-x) stays a normal float32 for x below ~87; a problem whose cost range over eps exceeds
#: this runs in the log domain.
LOG_DOMAIN_RANGE = 80.0


@dataclass(frozen=True)
class Transport:
    """One f_OT call: over the rows ``slots`` of a heat map (indices into its classes).

    ``marginal``: the class marginal (positive, sums to 1), None for uniform; ``kl``: whether
    it is KL-relaxed (unbalanced OT, weight ``DHRParams.marginal_kl``).
    """

    slots: np.ndarray
    marginal: np.ndarray | None
    kl: bool


@dataclass(frozen=True)
class SinkhornResult:
    """Plans ``[B, N, K]`` (total mass 1, zero on padding) and, per problem, how it went."""

    plan: torch.Tensor
    iterations: torch.Tensor  # [B] int64
    error: torch.Tensor  # [B]: L1 error of the cell marginal at the last check
    converged: torch.Tensor  # [B] bool
    log_domain: torch.Tensor  # [B] bool


def sinkhorn(
    scores: torch.Tensor,
    rows: torch.Tensor | None = None,
    cols: torch.Tensor | None = None,
    *,
    eps: float = OTParams.eps,
    col_marginal: torch.Tensor | None = None,
    kl_weight: float | None = None,
    tol: float = OTParams.tol,
    max_iter: int = OTParams.max_iter,
    check_every: int = OTParams.check_every,
    checks_per_sync: int | None = None,
    validate: bool = True,
) -> SinkhornResult:
    """Entropic OT plans for the costs ``1 - scores`` (``G = exp(-(1 - S) / eps)``).

    Parameters
    ----------
    scores : tensor, shape (B, N, K), floating
        Similarity of each of N cells to each of K classes (finite; usually in [0, 1]).
    rows, cols : bool tensors, shapes (B, N) and (B, K), optional
        Valid cells and classes of each problem (default: all).
    eps : float
        Entropic regularisation.
    col_marginal : tensor, shape (B, K), optional
        Class marginal ``v``, positive on valid classes (normalised here); uniform ``1/K``
        when omitted. The cell marginal ``u`` is always uniform, ``1/N``.
    kl_weight : float, optional
        When given, the class marginal is KL-relaxed (unbalanced OT):
        ``c <- (v / (G^T r)) ** (w / (w + eps))``.
    tol, max_iter, check_every : as :class:`~dhr_label.params.OTParams`
        A problem stops at the first check (every ``check_every`` iterations) where the L1
        error of its cell marginal is below ``tol``; with the class update just done, the
        balanced class marginal is exact, so that is the whole marginal error.
    checks_per_sync : int, optional
        How many checks may pass before the loop waits to learn that every problem stopped
        (default: 1 on the CPU, 4 on a device). Results do not depend on it.
    validate : bool
        Check that the scores are finite and the class marginal positive (two waits for the
        device; :func:`transport` skips them: its scores and marginals come from the stages).

    Returns
    -------
    SinkhornResult
        ``plan = diag(r) G diag(c)`` per problem.

    Notes
    -----
    Each row of the cost is shifted by its minimum before exponentiating (absorbed by ``r``),
    so no row underflows; a problem whose remaining cost range over ``eps`` exceeds
    :data:`LOG_DOMAIN_RANGE` iterates in the log domain.

    Examples
    --------
    >>> s = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    >>> plan = sinkhorn(s, eps=0.1).plan[0]
    >>> [round(x, 4) for x in plan.sum(dim=1).tolist()], [round(x, 4) for x in plan.sum(dim=0).tolist()]
    ([0.5, 0.5], [0.5, 0.5])
    """
    if scores.ndim != 3 or min(scores.shape) < 1:
        raise ValueError(f"scores must be B x N x K with N, K >= 1, got shape {tuple(scores.shape)}")
    batch, n, k = scores.shape
    device, dtype = scores.device, scores.dtype
    rows = torch.ones(batch, n, dtype=torch.bool, device=device) if rows is None else rows
    cols = torch.ones(batch, k, dtype=torch.bool, device=device) if cols is None else cols
    valid = rows[:, :, None] & cols[:, None, :]
    if validate and not bool(torch.isfinite(torch.where(valid, scores, 0.0)).all()):
        raise ValueError("scores must be finite")
    cost = 1.0 - scores
    low = torch.where(valid, cost, torch.inf).amin(dim=2, keepdim=True)
    high = torch.where(valid, cost, -torch.inf).amax(dim=2, keepdim=True)
    shifted = torch.where(valid, cost - torch.where(torch.isfinite(low), low, 0.0), 0.0)
    spread = torch.where(rows, (high - low)[:, :, 0], 0.0).amax(dim=1)
    log_domain = spread / eps > LOG_DOMAIN_RANGE
    u = rows / rows.sum(dim=1, keepdim=True).to(dtype)
    if col_marginal is None:
        v = cols / cols.sum(dim=1, keepdim=True).to(dtype)
    else:
        v = torch.where(cols, col_marginal.to(dtype), 0.0)
        if validate and bool((torch.where(cols, v, 1.0) <= 0).any()):
            raise ValueError("col_marginal must be positive on every valid class")
        v = v / v.sum(dim=1, keepdim=True)
    power = 1.0 if kl_weight is None else kl_weight / (kl_weight + eps)
    if checks_per_sync is None:
        checks_per_sync = 1 if device.type == "cpu" else 4
    loop = _Loop(rows, tol, max_iter, check_every, checks_per_sync)
    kernel = torch.where(valid & ~log_domain[:, None, None], torch.exp(-shifted / eps), valid.to(dtype))
    plan = loop.plain(kernel, u, v, power, active=~log_domain)
    if bool(log_domain.any()):  # rare: scores in [0, 1] need it only for eps < 1 / 80
        neg = torch.where(valid, -shifted / eps, -torch.inf)
        plan = torch.where(log_domain[:, None, None], loop.logarithmic(neg, u, v, power, active=log_domain), plan)
    return SinkhornResult(plan, loop.iterations, loop.error, loop.error < tol, log_domain)


class _Loop:
    """The iterations of :func:`sinkhorn`: per-problem stopping, freezing and host checks."""

    def __init__(self, rows: torch.Tensor, tol: float, max_iter: int, check_every: int, checks_per_sync: int):
        self.rows, self.tol, self.max_iter, self.check_every, self.checks_per_sync = rows, tol, max_iter, check_every, checks_per_sync
        batch, device = rows.shape[0], rows.device
        self.iterations = torch.zeros(batch, dtype=torch.int64, device=device)
        self.error = torch.full((batch,), torch.inf, dtype=WORK, device=device)

    def _freeze(self, batch: int) -> bool:
        # A lone problem that the host checks at every check stops by breaking out of the
        # loop; otherwise a converged problem keeps its values while the others iterate.
        return batch > 1 or self.checks_per_sync > 1

    def _run(self, step, marginal_error, state: list[torch.Tensor], active: torch.Tensor) -> list[torch.Tensor]:
        """Iterate ``state <- step(state)`` up to ``max_iter``, checking ``marginal_error(state)``."""
        freeze = self._freeze(len(active))
        flag = _DoneFlag(active.device)
        checks = 0
        for it in range(1, self.max_iter + 1):
            new = step(state)
            state = [torch.where(active[:, None], a, b) for a, b in zip(new, state)] if freeze else new
            if it % self.check_every == 0 or it == self.max_iter:
                err = marginal_error(state).to(WORK)
                self.error = torch.where(active, err, self.error)
                self.iterations = torch.where(active, it, self.iterations)
                active = active & ~(err < self.tol)
                checks += 1
                flag.post(active)
                if checks % self.checks_per_sync == 0 and flag.done(wait=True) or flag.done(wait=False):
                    break
        return state

    def plain(self, kernel, u, v, power: float, *, active) -> torch.Tensor:
        tiny = torch.finfo(kernel.dtype).tiny  # a padded row or class has a zero marginal: 0 / tiny = 0

        def step(state):
            r = u / torch.bmm(kernel, state[1][:, :, None])[:, :, 0].clamp_min(tiny)
            c = v / torch.bmm(r[:, None, :], kernel)[:, 0, :].clamp_min(tiny)
            return [r, c**power if power != 1.0 else c]

        def marginal_error(state):
            r, c = state
            return ((r * torch.bmm(kernel, c[:, :, None])[:, :, 0]) - u).abs().sum(dim=1)

        r, c = self._run(step, marginal_error, [torch.zeros_like(u), (v > 0).to(v.dtype)], active)
        return (r[:, :, None] * kernel) * c[:, None, :]

    def logarithmic(self, neg, u, v, power: float, *, active) -> torch.Tensor:
        log_u = torch.where(self.rows, u, 1.0).log().masked_fill(~self.rows, -torch.inf)
        cols = v > 0
        log_v = torch.where(cols, v, 1.0).log().masked_fill(~cols, -torch.inf)

        def step(state):
            f = torch.where(self.rows, log_u - torch.logsumexp(neg + state[1][:, None, :], dim=2), -torch.inf)
            g = torch.where(cols, log_v - torch.logsumexp(neg + f[:, :, None], dim=1), -torch.inf)
            return [f, g * power if power != 1.0 else g]

        def marginal_error(state):
            f, g = state
            sums = torch.exp(f + torch.logsumexp(neg + g[:, None, :], dim=2))
            return torch.where(self.rows, (sums - u).abs(), 0.0).sum(dim=1)

        start = [torch.zeros_like(u).masked_fill(~self.rows, -torch.inf), torch.zeros_like(v).masked_fill(~cols, -torch.inf)]
        f, g = self._run(step, marginal_error, start, active)
        plan = torch.exp(neg + f[:, :, None] + g[:, None, :])
        return torch.where(torch.isfinite(plan), plan, 0.0)


class _DoneFlag:
    """Whether every problem has stopped, learnt by the host without stalling the device.

    On the CPU the answer is read at once. On a device the flag is copied to pinned host memory
    behind the queued work and an event marks its arrival: ``done(wait=False)`` looks only at
    a copy that has landed, ``done(wait=True)`` waits for the latest one.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = device.type == "cpu"
        self.host = None if self.cpu else torch.zeros((), dtype=torch.bool).pin_memory()
        self.event = None
        self.latest = None

    def post(self, active: torch.Tensor) -> None:
        still = active.any()
        if self.cpu:
            self.latest = still
            return
        self.host.copy_(still, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()

    def done(self, *, wait: bool) -> bool:
        if self.cpu:
            return self.latest is not None and not bool(self.latest)
        if self.event is None:
            return False
        if wait:
            self.event.synchronize()
        elif not self.event.query():
            return False
        return not bool(self.host)


def transport(
    scores: list[torch.Tensor], calls: list[Transport | None], params: OTParams, kl_weight: float
) -> tuple[list[torch.Tensor], list[str | None]]:
    """f_OT of several ``G x N`` score maps over their rows (classes), as one batched Sinkhorn.

    Problem i is ``scores[i]`` (all on one device) with ``calls[i]`` (its class marginal and
    KL switch; None, or a single class: nothing to transport, all ones). Returns per problem
    the ``G x N`` values in [0, 1] (the plan min-max normalised per class over the cells, Eq. 2;
    callers use ``S * f_OT(S)``) and a note when Sinkhorn stopped at ``max_iter`` (else None).
    """
    out: list[torch.Tensor | None] = [None] * len(scores)
    notes: list[str | None] = [None] * len(scores)
    todo = [i for i, call in enumerate(calls) if call is not None and scores[i].shape[0] > 1]
    for i in set(range(len(scores))) - set(todo):
        out[i] = torch.ones_like(scores[i])
    for kl in (False, True):  # one batch per KL switch (its exponent is a scalar)
        group = [i for i in todo if calls[i].kl == kl]
        if group:
            _solve(scores, calls, group, params, kl_weight if kl else None, out, notes)
    return out, notes


def _solve(scores, calls, group: list[int], params: OTParams, kl_weight, out, notes) -> None:
    device = scores[group[0]].device
    stacked, shapes = pad_stack([scores[i].T for i in group], device)  # [B, N, K]
    rows = length_mask([n for n, _ in shapes], stacked.shape[1], device)
    cols = length_mask([g for _, g in shapes], stacked.shape[2], device)
    marginal = None
    if any(calls[i].marginal is not None for i in group):
        marginal = torch.ones(stacked.shape[0], stacked.shape[2], dtype=WORK)
        for j, i in enumerate(group):
            if calls[i].marginal is not None:
                marginal[j, : len(calls[i].marginal)] = torch.as_tensor(calls[i].marginal, dtype=WORK)
        marginal = to_device(marginal, device)
    result = sinkhorn(stacked, rows, cols, eps=params.eps, col_marginal=marginal, kl_weight=kl_weight,
                      tol=params.tol, max_iter=params.max_iter, check_every=params.check_every, validate=False)
    values = minmax(result.plan, 1, params.minmax_clip, valid=rows[:, :, None])
    converged = to_host(result.converged)
    for j, i in enumerate(group):
        n, g = shapes[j]
        out[i] = values[j, :n, :g].T.to(scores[i].dtype)
        if not converged[j]:
            notes[i] = (f"OTConvergenceWarning: Sinkhorn did not converge: marginal error {float(result.error[j]):.2e} "
                        f">= tol {params.tol:.0e} after {int(result.iterations[j])} iterations")
