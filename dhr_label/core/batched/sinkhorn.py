"""f_OT (Eq. 2) for many problems at once: padded Sinkhorn on any device.

The same algorithm as :mod:`dhr_label.core.ot` for B problems that differ in cells N and
classes K: every batch is padded and carries boolean masks (``rows``: valid cells, ``cols``:
valid classes), so padded entries never reach a minimum, a maximum or a marginal. No host
synchronisation inside the loop: a converged problem is frozen in place (so each stops at the
same iteration as the per-image loop), and the loop asks the device whether any problem still
runs only every ``sync_every`` iterations.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ...params import OTParams
from ..cap import minmax
from ..ot import _LOG_DOMAIN_RANGE
from ..ot import f_ot as f_ot_numpy
from ..pipeline import Transport
from .tensors import WORK, length_mask


@dataclass
class BatchedSinkhorn:
    """Plans ``[B, N, K]`` (zero on padding) and, per problem, how the iterations went."""

    plan: torch.Tensor
    iterations: torch.Tensor  # [B] int64
    error: torch.Tensor  # [B]
    converged: torch.Tensor  # [B] bool


def sinkhorn(
    scores: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    *,
    eps: float = OTParams.eps,
    col_marginal: torch.Tensor | None = None,
    kl_weight: float | None = None,
    tol: float = OTParams.tol,
    max_iter: int = OTParams.max_iter,
    check_every: int = OTParams.check_every,
    sync_every: int = 50,
    skip: torch.Tensor | None = None,
) -> BatchedSinkhorn:
    """Entropic OT plans for the costs ``1 - scores``, plain kernel, as :func:`ot.sinkhorn`.

    Parameters
    ----------
    scores : tensor, shape (B, N, K)
    rows, cols : bool tensors, shapes (B, N) and (B, K)
        Valid cells and classes of each problem.
    col_marginal : tensor, shape (B, K), optional
        Positive on valid classes (normalised here); uniform when omitted.
    sync_every : int
        Iterations between the host's checks that some problem still runs (results do not
        depend on it: converged problems are frozen at their own stopping iteration).
    skip : bool tensor, shape (B,), optional
        Problems not to iterate at all (their plan is zero), e.g. those for the log domain.
    """
    valid = rows[:, :, None] & cols[:, None, :]
    cost = torch.where(valid, 1.0 - scores, torch.inf)
    low = cost.amin(dim=2, keepdim=True)
    shifted = torch.where(valid, cost - torch.where(torch.isfinite(low), low, 0.0), 0.0)
    kernel = torch.where(valid, torch.exp(-shifted / eps), 0.0)
    u = rows / rows.sum(dim=1, keepdim=True).to(scores.dtype)
    if col_marginal is None:
        v = cols / cols.sum(dim=1, keepdim=True).to(scores.dtype)
    else:
        v = torch.where(cols, col_marginal, 0.0)
        v = v / v.sum(dim=1, keepdim=True)
    power = 1.0 if kl_weight is None else kl_weight / (kl_weight + eps)
    batch = scores.shape[0]
    c = cols.to(scores.dtype)
    r = torch.zeros_like(u)
    active = torch.ones(batch, dtype=torch.bool, device=scores.device) if skip is None else ~skip
    iterations = torch.zeros(batch, dtype=torch.int64, device=scores.device)
    error = torch.full((batch,), torch.inf, dtype=scores.dtype, device=scores.device)
    checks = 0
    for it in range(1, max_iter + 1):
        r_new = torch.where(rows, u / torch.bmm(kernel, c[:, :, None])[:, :, 0], 0.0)
        c_new = torch.where(cols, v / torch.bmm(r_new[:, None, :], kernel)[:, 0, :], 0.0)
        if power != 1.0:
            c_new = c_new**power
        r = torch.where(active[:, None], r_new, r)
        c = torch.where(active[:, None], c_new, c)
        if it % check_every == 0 or it == max_iter:
            rowsum = r * torch.bmm(kernel, c[:, :, None])[:, :, 0]
            err = torch.where(rows, (rowsum - u).abs(), 0.0).sum(dim=1)
            error = torch.where(active, err, error)
            iterations = torch.where(active, it, iterations)
            active = active & ~(err < tol)
            checks += 1
            if checks % max(1, sync_every // check_every) == 0 and not bool(active.any()):
                break
    plan = (r[:, :, None] * kernel) * c[:, None, :]
    return BatchedSinkhorn(plan, iterations, error, error < tol)


def transport(
    scores: list[torch.Tensor], calls: list[Transport | None], params: OTParams, kl_weight: float
) -> tuple[list[torch.Tensor], list[str | None]]:
    """``f_OT`` of several ``G x N`` score maps over their rows, as ``core.dhr.transport``.

    Problem i is ``scores[i]`` (on one device) with ``calls[i]`` (its class marginal and KL
    switch; None: nothing to transport, all ones). Returns per problem the ``G x N`` values in
    [0, 1] and the numpy core's warning text when Sinkhorn stopped at ``max_iter`` (else None).

    A problem whose cost range needs the log domain (``ot.sinkhorn``) goes through the numpy
    core instead (rare: scores in [0, 1] never do at eps >= 0.0125).
    """
    out: list[torch.Tensor | None] = [None] * len(scores)
    notes: list[str | None] = [None] * len(scores)
    todo = [i for i, call in enumerate(calls) if call is not None and scores[i].shape[0] > 1]
    for i in set(range(len(scores))) - set(todo):
        out[i] = torch.ones_like(scores[i])
    for kl in (False, True):  # one batch per KL switch (its exponent is a scalar)
        group = [i for i in todo if calls[i].kl == kl]
        if group:
            _batch(scores, calls, group, params, kl_weight if kl else None, out, notes)
    return out, notes


def _batch(scores, calls, group, params: OTParams, kl_weight, out, notes) -> None:
    device = scores[group[0]].device
    k_max = max(scores[i].shape[0] for i in group)
    n_max = max(scores[i].shape[1] for i in group)
    stacked = torch.zeros((len(group), n_max, k_max), dtype=WORK, device=device)
    marginal = torch.ones((len(group), k_max), dtype=WORK, device=device)
    for j, i in enumerate(group):
        g, n = scores[i].shape
        stacked[j, :n, :g] = scores[i].T
        if calls[i].marginal is not None:
            marginal[j, :g] = torch.as_tensor(calls[i].marginal, dtype=WORK)
    rows = length_mask([scores[i].shape[1] for i in group], n_max, device)
    cols = length_mask([scores[i].shape[0] for i in group], k_max, device)
    valid = rows[:, :, None] & cols[:, None, :]
    cost = 1.0 - stacked
    spread = torch.where(valid, cost, -torch.inf).amax(dim=2) - torch.where(valid, cost, torch.inf).amin(dim=2)
    log_domain = torch.where(rows, spread, 0.0).amax(dim=1) / params.eps > _LOG_DOMAIN_RANGE
    result = sinkhorn(
        stacked, rows, cols, eps=params.eps, col_marginal=marginal, kl_weight=kl_weight,
        tol=params.tol, max_iter=params.max_iter, check_every=params.check_every, skip=log_domain,
    )
    values = minmax(result.plan, 1, params.minmax_clip, valid=rows[:, :, None])
    # One transfer for the whole batch: which problems need the log domain, which did not converge.
    host = torch.stack([log_domain, result.converged]).cpu().numpy()
    for j, i in enumerate(group):
        g, n = scores[i].shape
        if host[0, j]:
            out[i], notes[i] = _numpy_f_ot(scores[i], calls[i], params, kl_weight)
            continue
        out[i] = values[j, :n, :g].T
        if not host[1, j]:
            notes[i] = (
                f"OTConvergenceWarning: Sinkhorn did not converge: marginal error {float(result.error[j]):.2e} "
                f">= tol {params.tol:.0e} after {int(result.iterations[j])} iterations"
            )


def _numpy_f_ot(scores: torch.Tensor, call: Transport, params: OTParams, kl_weight) -> tuple[torch.Tensor, str | None]:
    """The numpy core's f_OT (log domain) for one problem, its warning as a note."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values = f_ot_numpy(scores.T.cpu().numpy(), params, col_marginal=call.marginal, kl_weight=kl_weight)
    note = next((f"{w.category.__name__}: {w.message}" for w in caught), None)
    return torch.as_tensor(np.ascontiguousarray(values.T), dtype=scores.dtype, device=scores.device), note
