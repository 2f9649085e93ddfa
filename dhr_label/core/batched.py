"""The non-CRF work of DHR for a batch of images, in torch (any device, float32).

The same maths as the numpy core (ot.py, cap.py, dhr.py), for B images at once: images differ
in cells N, tags K and classes G, so every batch is padded and carries boolean masks (``rows``:
valid cells, ``cols``: valid classes); padded entries never reach a minimum, a maximum or a
marginal. The CRFs stay on CPU (pydensecrf); the full-resolution upsampling that feeds them
stays with them (the numpy core), so only low-resolution maps travel.

No host synchronisation inside the Sinkhorn loop: converged images are frozen in place (so
each image stops at the same iteration as the per-image numpy loop), and the loop asks the
device whether any image is still running only every ``sync_every`` iterations.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..params import DHRParams, Marginal, OTParams
from .dhr import class_marginal, correlated_groups
from .ot import _LOG_DOMAIN_RANGE
from .ot import f_ot as f_ot_numpy


def pad_stack(arrays: list[np.ndarray], device, *, dtype=torch.float32) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """Stack arrays of equal rank into one zero-padded tensor; also return their shapes."""
    shapes = [tuple(a.shape) for a in arrays]
    size = [len(arrays)] + [max(s[d] for s in shapes) for d in range(len(shapes[0]))]
    out = torch.zeros(size, dtype=dtype, device=device)
    for i, array in enumerate(arrays):
        out[(i, *[slice(0, n) for n in array.shape])] = torch.as_tensor(array, dtype=dtype).to(device, non_blocking=True)
    return out, shapes


def length_mask(lengths: list[int], size: int, device) -> torch.Tensor:
    """``[B, size]`` bool, True on the first ``lengths[b]`` entries of row b."""
    counts = torch.as_tensor(lengths, device=device)
    return torch.arange(size, device=device)[None, :] < counts[:, None]


# --------------------------------------------------------------------------------------------
# f_OT (Eq. 2), batched
# --------------------------------------------------------------------------------------------
@dataclass
class BatchedSinkhorn:
    """Plans ``[B, N, K]`` (zero on padding) and, per image, how the iterations went."""

    plan: torch.Tensor
    iterations: torch.Tensor  # [B] int64
    error: torch.Tensor  # [B] float32
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
        Valid cells and classes of each image.
    col_marginal : tensor, shape (B, K), optional
        Positive on valid classes (normalised here); uniform when omitted.
    sync_every : int
        Iterations between the host's checks that some image still runs (results do not
        depend on it: converged images are frozen at their own stopping iteration).
    skip : bool tensor, shape (B,), optional
        Images not to iterate at all (their plan is zero), e.g. those for the log domain.
    """
    valid = rows[:, :, None] & cols[:, None, :]
    cost = torch.where(valid, 1.0 - scores, torch.inf)
    low = cost.amin(dim=2, keepdim=True)
    shifted = torch.where(valid, cost - torch.where(torch.isfinite(low), low, 0.0), 0.0)
    kernel = torch.where(valid, torch.exp(-shifted / eps), 0.0)
    n = rows.sum(dim=1, keepdim=True).to(scores.dtype)
    u = rows / n
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
    error = torch.full((batch,), torch.inf, device=scores.device)
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


def minmax_columns(values: torch.Tensor, rows: torch.Tensor, clip: float = OTParams.minmax_clip) -> torch.Tensor:
    """Min-max of each column over the valid rows of every image (``[B, N, K]``, zero on padding)."""
    low = torch.where(rows[:, :, None], values, torch.inf).amin(dim=1, keepdim=True)
    high = torch.where(rows[:, :, None], values, -torch.inf).amax(dim=1, keepdim=True)
    out = (values - low) / torch.clamp(high - low, min=clip)
    return torch.where(rows[:, :, None], out, 0.0)


def minmax_rows(maps: torch.Tensor, cells: torch.Tensor, clip: float = OTParams.minmax_clip) -> torch.Tensor:
    """Min-max of each class row over the valid cells (``[B, G, N]``, zero on padded cells)."""
    low = torch.where(cells[:, None, :], maps, torch.inf).amin(dim=2, keepdim=True)
    high = torch.where(cells[:, None, :], maps, -torch.inf).amax(dim=2, keepdim=True)
    out = (maps - low) / torch.clamp(high - low, min=clip)
    return torch.where(cells[:, None, :], out, 0.0)


def f_ot(
    scores: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    params: DHRParams,
    *,
    col_marginal: torch.Tensor | None = None,
    kl: bool = False,
) -> tuple[torch.Tensor, list[str | None]]:
    """f_OT(S) of Eq. 2 for every image: ``[B, N, K]`` in [0, 1], and a warning per image.

    All ones on the valid entries of an image with one class. An image whose cost range
    needs the log domain (``ot.sinkhorn``) goes through the numpy core instead (rare: scores
    in [0, 1] never do at eps >= 0.0125). The warning is the numpy core's text when Sinkhorn
    stops at ``max_iter``, else None.
    """
    p = params.ot
    valid = rows[:, :, None] & cols[:, None, :]
    cost = 1.0 - scores
    spread = torch.where(valid, cost, -torch.inf).amax(dim=2) - torch.where(valid, cost, torch.inf).amin(dim=2)
    spread = torch.where(rows, spread, 0.0).amax(dim=1)
    single = cols.sum(dim=1) == 1
    log_domain = (spread / p.eps > _LOG_DOMAIN_RANGE) & ~single
    result = sinkhorn(
        scores, rows, cols, eps=p.eps, col_marginal=col_marginal, kl_weight=params.marginal_kl if kl else None,
        tol=p.tol, max_iter=p.max_iter, check_every=p.check_every, skip=log_domain | single,
    )
    out = minmax_columns(result.plan, rows, p.minmax_clip)
    out = torch.where(single[:, None, None] & valid, 1.0, out)
    # One transfer for the whole batch: which images need the log domain, which did not converge.
    host = torch.stack([log_domain, result.converged | single]).cpu().numpy()
    warnings: list[str | None] = [None] * scores.shape[0]
    for b in np.flatnonzero(~host[1] & ~host[0]):
        warnings[b] = (
            f"OTConvergenceWarning: Sinkhorn did not converge: marginal error {float(result.error[b]):.2e} "
            f">= tol {p.tol:.0e} after {int(result.iterations[b])} iterations"
        )
    for b in np.flatnonzero(host[0]):
        n, k = int(rows[b].sum()), int(cols[b].sum())
        marginal = None if col_marginal is None else col_marginal[b, :k].double().cpu().numpy()
        values = f_ot_numpy(
            scores[b, :n, :k].cpu().numpy(), eps=p.eps, col_marginal=marginal,
            kl_weight=params.marginal_kl if kl else None, tol=p.tol, max_iter=p.max_iter,
            check_every=p.check_every, minmax_clip=p.minmax_clip,
        )
        out[b, :n, :k] = torch.as_tensor(values, device=out.device)
    return out, warnings


# --------------------------------------------------------------------------------------------
# Step 1.1-1.2: seed scores
# --------------------------------------------------------------------------------------------
def seed_scores(
    cams: list[np.ndarray], labels: list[np.ndarray], bases: list[np.ndarray | None], params: DHRParams, device
) -> tuple[list[np.ndarray], list[str | None]]:
    """Step 1.1-1.2 for every image: ``A * f_OT(A)`` after ReLU and per-channel max normalisation.

    ``cams[b]`` is K x h x w (raw), ``labels[b]`` its K tags, ``bases[b]`` M_base or None (for
    an ``area`` class marginal). Returns the K x h x w float32 scores (as
    :func:`dhr.seed_scores`) and each image's OT warning (or None).
    """
    flat = [c.reshape(c.shape[0], -1) for c in cams]
    a, shapes = pad_stack(flat, device)  # [B, K, N]
    cols = length_mask([s[0] for s in shapes], a.shape[1], device)
    rows = length_mask([s[1] for s in shapes], a.shape[2], device)
    a = torch.clamp(a, min=0.0)
    a = a / torch.clamp(a.amax(dim=2, keepdim=True), min=1e-5)
    warnings: list[str | None] = [None] * len(cams)
    if params.steps.ot and any(s[0] > 1 for s in shapes):
        cells = a.transpose(1, 2)  # [B, N, K]
        marginals = [
            class_marginal(params.marginal_init, tags, base, params.marginal_floor)[0] for tags, base in zip(labels, bases)
        ]
        marginal = _marginal_tensor(marginals, a.shape[1], device)
        values, warnings = f_ot(cells, rows, cols, params, col_marginal=marginal, kl=params.marginal_init is Marginal.unbalanced)
        a = (cells * values).transpose(1, 2)
    host = a.cpu().numpy()
    return [host[b, : c.shape[0], : flat[b].shape[1]].reshape(c.shape) for b, c in enumerate(cams)], warnings


def _marginal_tensor(marginals: list[np.ndarray | None], size: int, device) -> torch.Tensor | None:
    """Class marginals padded to ``[B, size]``; None when every image is uniform.

    In a mixed batch a uniform image gets equal weights (normalised over its own classes by
    :func:`sinkhorn`, which also ignores the padded entries).
    """
    if all(m is None for m in marginals):
        return None
    out = torch.ones((len(marginals), size), dtype=torch.float32)
    for b, m in enumerate(marginals):
        if m is not None:
            out[b] = 0.0
            out[b, : len(m)] = torch.as_tensor(m, dtype=torch.float32)
    return out.to(device)


# --------------------------------------------------------------------------------------------
# Steps 2-3: CAP, cosine heat maps, WSS grouping, OT
# --------------------------------------------------------------------------------------------
def cell_fractions(
    inits: list[np.ndarray], classes: list[np.ndarray], grids: list[tuple[int, int]], mode: str, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """CAP weights ``[B, G, N]`` of :func:`cap.class_cell_fractions` and the valid cells ``[B, N]``.

    One scatter over every pixel of the batch: pixel -> (image, class slot, cell), where
    unlabelled pixels go to an extra slot G and padding to an extra cell N.
    """
    g_max = max(len(c) for c in classes)
    n_max = max(h * w for h, w in grids)
    per_image = (g_max + 1) * (n_max + 1)
    index = []
    for b, (init, members, (gh, gw)) in enumerate(zip(inits, classes, grids)):
        height, width = init.shape
        lookup = torch.full((256,), g_max, dtype=torch.int64)
        lookup[torch.as_tensor(members, dtype=torch.int64)] = torch.arange(len(members))
        slot = lookup.to(device)[torch.as_tensor(init, device=device).long()]
        rows = (torch.arange(height, device=device) * gh) // height
        cols = (torch.arange(width, device=device) * gw) // width
        cell = rows[:, None] * gw + cols[None, :]
        index.append((b * per_image + slot * (n_max + 1) + cell).reshape(-1))
    flat = torch.cat(index)
    counts = torch.zeros(len(inits) * per_image, dtype=torch.float32, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
    counts = counts.reshape(len(inits), g_max + 1, n_max + 1)[:, :, :n_max]
    per_cell = counts.sum(dim=1)  # every pixel of a cell, labelled or not
    counts = counts[:, :g_max]
    cells = length_mask([h * w for h, w in grids], n_max, device)
    if mode == "soft":
        return counts / torch.clamp(per_cell, min=1.0)[:, None, :], cells
    if mode != "majority":
        raise ValueError(f"mode must be 'soft' or 'majority', got {mode!r}")
    labelled = counts.sum(dim=1)
    top, winner = counts.max(dim=1)  # the first maximum: the lower class id, as numpy
    wins = (top >= per_cell - labelled) & (labelled > 0)
    weights = F.one_hot(winner, g_max).transpose(1, 2).to(torch.float32)
    return weights * wins[:, None, :], cells


def l2_normalise(vectors: torch.Tensor, dim: int, eps: float = 1e-8) -> torch.Tensor:
    return vectors / torch.clamp(torch.sqrt((vectors**2).sum(dim=dim, keepdim=True)), min=eps)


def class_centroids(features: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean features ``[B, G, D]`` (zero for an absent class) and presence ``[B, G]``."""
    mass = weights.sum(dim=2)
    present = mass > 0
    sums = torch.bmm(weights, features.transpose(1, 2))
    return torch.where(present[:, :, None], sums / torch.clamp(mass, min=1e-12)[:, :, None], 0.0), present


def heat_maps(features: torch.Tensor, weights: torch.Tensor, cells: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max cosine heat maps ``[B, G, N]`` of ``features`` ``[B, D, N]`` and the centroids."""
    centroids, present = class_centroids(features, weights)
    cosine = torch.bmm(l2_normalise(centroids, 2), l2_normalise(features, 1))
    maps = minmax_rows(cosine, cells, clip)
    return torch.where(present[:, :, None], maps, 0.0), centroids


def resize_bilinear(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``C x h x w`` to ``C x H x W``, bilinear, ``align_corners=False`` (as core.resize)."""
    if tuple(maps.shape[1:]) == tuple(size):
        return maps
    return F.interpolate(maps[None], size=tuple(size), mode="bilinear", align_corners=False)[0]


@dataclass
class HeatBatch:
    """Steps 2-3 of a batch: per image the heat maps ``G x h x w``, groups, OT warnings."""

    heat: list[np.ndarray]
    grids: list[tuple[int, int]]
    groups: list[list[list[int]]]
    warnings: list[list[str]]


def rebalance_heat(
    inits: list[np.ndarray],
    classes: list[np.ndarray],
    uss: list[torch.Tensor] | None,
    wss: list[list[torch.Tensor]] | None,
    params: DHRParams,
    device,
) -> HeatBatch:
    """The heat maps H of Steps 2-3 (before the final upsampling and CRF) for a batch.

    Parameters
    ----------
    inits : H x W uint8 per image (M_init)
    classes : the class ids of each M_init (2 or more), ascending
    uss, wss : per image, the USS map ``D x h x w`` and the WSS layers, as device tensors
        (either None when its step is off)

    The class marginal of every OT call is :func:`dhr.class_marginal` over M_init, on the host.
    """
    steps = params.steps
    clip = params.ot.minmax_clip
    cap = params.cap.value
    batch = len(inits)

    def marginal(b: int, members: np.ndarray) -> np.ndarray | None:
        return class_marginal(params.marginal_rebalance, members, inits[b], params.marginal_floor)[0]

    grids = [tuple(u.shape[1:]) for u in uss] if steps.uss else [tuple(layers[0].shape[1:]) for layers in wss]
    weights, cells = cell_fractions(inits, classes, grids, cap, device)
    g_max, n_max = weights.shape[1:]
    class_mask = length_mask([len(c) for c in classes], g_max, device)
    warnings: list[list[str]] = [[] for _ in range(batch)]
    groups: list[list[list[int]]] = [[] for _ in range(batch)]
    if steps.uss:
        features, _ = pad_stack_tensors([u.reshape(u.shape[0], -1) for u in uss], device)
        heat, centroids = heat_maps(features, weights, cells, clip)
        found = [correlated_groups(c[: len(m)], params.tau) for c, m in zip(centroids.cpu().numpy(), classes)] if steps.wss else [[]] * batch
    else:
        found = [[]] * batch
    # Step 3.2 only where it is used: an image with a 2+ group, or WSS alone (Table 6 row 6).
    needs_wss = [bool(f) or not steps.uss for f in found] if steps.wss else [False] * batch
    if any(needs_wss):
        s_ws = wss_heat(wss, grids, weights, cells, needs_wss, clip, device)
    if steps.uss and steps.wss:
        pairs = [(b, members) for b in range(batch) for members in found[b]]
        if pairs:
            scores = [s_ws[b, members] for b, members in pairs]
            chosen = [classes[b][members] for b, members in pairs]
            ot, notes = _ot_over(
                scores, [marginal(b, ids) for (b, _), ids in zip(pairs, chosen)], n_max, cells[[b for b, _ in pairs]], params, device
            )
            for (b, members), values, note in zip(pairs, ot, notes):
                index = torch.as_tensor(members, device=device)
                heat[b, index] = heat[b, index] * values
                groups[b].append(classes[b][members].tolist())
                if note:
                    warnings[b].append(note)
    elif steps.wss:
        heat = s_ws
    final, notes = _ot_over(
        [heat[b, : len(classes[b])] for b in range(batch)],
        [marginal(b, classes[b]) for b in range(batch)], n_max, cells, params, device,
    )
    for b, note in enumerate(notes):
        if note:
            warnings[b].append(note)
    stacked = torch.zeros_like(heat)
    for b, values in enumerate(final):
        stacked[b, : values.shape[0]] = values
    heat = minmax_rows(heat * stacked, cells, clip)
    heat = torch.where(class_mask[:, :, None], heat, 0.0)
    host = heat.cpu().numpy()
    out = [host[b, : len(classes[b]), : grids[b][0] * grids[b][1]].reshape(len(classes[b]), *grids[b]) for b in range(batch)]
    return HeatBatch(out, grids, groups, warnings)


def pad_stack_tensors(tensors: list[torch.Tensor], device) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """:func:`pad_stack` for tensors already on the device."""
    shapes = [tuple(t.shape) for t in tensors]
    size = [len(tensors)] + [max(s[d] for s in shapes) for d in range(len(shapes[0]))]
    out = torch.zeros(size, dtype=torch.float32, device=device)
    for i, t in enumerate(tensors):
        out[(i, *[slice(0, n) for n in t.shape])] = t
    return out, shapes


def wss_heat(wss, grids, weights, cells, needed, clip, device) -> torch.Tensor:
    """Step 3.2: per layer, resize to the grid, CAP, cosine, min-max; average; min-max.

    Images not ``needed`` get zeros (their WSS maps would not be used).
    """
    batch, g_max, n_max = weights.shape
    total = torch.zeros_like(weights)
    chosen = [b for b in range(batch) if needed[b]]
    depth = max(len(wss[b]) for b in chosen)
    layers_of = torch.as_tensor([len(wss[b]) if needed[b] else 1 for b in range(batch)], dtype=torch.float32, device=device)
    for index in range(depth):
        members = [b for b in chosen if index < len(wss[b])]
        resized = [resize_bilinear(wss[b][index], grids[b]) for b in members]
        features, _ = pad_stack_tensors([r.reshape(r.shape[0], -1) for r in resized], device)
        maps, _ = heat_maps(features, weights[members], cells[members], clip)
        total[members] += maps
    return minmax_rows(total / layers_of[:, None, None], cells, clip)


def _ot_over(scores: list[torch.Tensor], marginals: list[np.ndarray | None], n_max: int, cells: torch.Tensor, params: DHRParams, device):
    """``f_OT`` over the transposed ``G x N`` scores of several (image, class set) pairs.

    Returns per pair the ``G x N`` values and the warning (or None).
    """
    k_max = max(s.shape[0] for s in scores)
    stacked = torch.zeros((len(scores), n_max, k_max), device=device)
    for i, s in enumerate(scores):
        stacked[i, : s.shape[1], : s.shape[0]] = s.T
    cols = length_mask([s.shape[0] for s in scores], k_max, device)
    marginal = _marginal_tensor(marginals, k_max, device)
    values, warnings = f_ot(
        stacked, cells, cols, params, col_marginal=marginal, kl=params.marginal_rebalance is Marginal.unbalanced
    )
    return [values[i, : s.shape[1], : s.shape[0]].T for i, s in enumerate(scores)], warnings

