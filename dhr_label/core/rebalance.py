"""Steps 2 and 3 of DHR: USS and WSS rebalancing (Eqs. 3 and 4), then the final mask.

Two stages over a batch of states (:mod:`.pipeline`): HEAT_MAPS (CAP, cosine heat maps, WSS
groups, the OT calls: H on each image's feature grid) and FINAL_MASK (H upsampled, the second
DenseCRF, M_dh; ours: the vanished-class guard and ignore-below). Images differ in classes and
grids: maps are padded into one tensor with masks of what is real.
"""
from __future__ import annotations

import numpy as np
import torch

from ..params import DHRParams
from .cap import cell_fractions, correlated_groups, heat_maps, minmax, posterior_support
from .crf import ImageCRFs
from .ot import transport
from .pipeline import (
    IGNORE,
    ImageState,
    feature_grid,
    mixes_wss,
    needs_wss_maps,
    prototype_rows,
    rebalance_transports,
    uses_groups,
)
from .resize import resize
from .tensors import WORK, length_mask, to_device, to_host


def grid_heat_maps(
    maps: list[torch.Tensor], grids: list[tuple[int, int]], weights: torch.Tensor, *, clip: float,
    prototype_rows: list | None = None, weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Heat maps of one feature source for a batch: ``[B, G, N]`` (zero on padding) and the
    centroids ``[B, G, D]``.

    ``maps[b]`` (D x h_b x w_b, on its own grid) is seen on ``grids[b]``, where ``weights[b]``
    (from :func:`~.cap.cell_fractions`) lives. Images whose map and grid have the same shapes
    are computed together (a dataset of one image size is one group). ``prototype_rows[b]``:
    the prototypes of image b's classes (G_b x D, numpy) or None, blended with ``weight``.
    """
    batch, g_max, _ = weights.shape
    heat = torch.zeros_like(weights)
    centroids = torch.zeros(batch, g_max, maps[0].shape[0], dtype=WORK, device=weights.device)
    for index, cells, features, weights_g, protos in _same_shapes(maps, grids, weights, prototype_rows):
        heat[index, :, :cells], centroids[index] = heat_maps(features, weights_g, clip=clip, prototypes=protos, weight=weight)
    return heat, centroids


def grid_support(
    maps: list[torch.Tensor], grids: list[tuple[int, int]], weights: torch.Tensor, cells: torch.Tensor, counts: list[int], *,
    temperature: float, prior: float, prototype_rows: list | None = None, weight: float = 0.0,
) -> torch.Tensor:
    """The CAP weights of Steps 2-3 weighted by each class's posterior at the cell
    (:func:`~.cap.posterior_support`, ours): ``[B, G, N]``, zero on padding. ``maps``: the USS
    maps; the other arguments as :func:`grid_heat_maps`'s, ``cells`` and ``counts`` what is real."""
    support = torch.zeros_like(weights)
    real = length_mask(counts, weights.shape[1], weights.device)
    for index, n, features, weights_g, protos in _same_shapes(maps, grids, weights, prototype_rows):
        support[index, :, :n] = posterior_support(features, weights_g, real[index], temperature=temperature, prior=prior,
                                                  prototypes=protos, weight=weight)
    return support * cells[:, None, :]


def _same_shapes(maps, grids, weights, prototype_rows):
    """The images of a batch whose map and grid have the same shapes, together (a dataset of one
    image size is one group): per group, the image indices, its cells, the maps ``[B_g, D, h_m,
    w_m]``, its weights ``[B_g, G, h, w]`` and prototypes ``[B_g, G, D]`` (or None)."""
    device, g_max = weights.device, weights.shape[1]
    groups: dict[tuple, list[int]] = {}
    for b, (m, grid) in enumerate(zip(maps, grids)):
        groups.setdefault((tuple(m.shape), tuple(grid)), []).append(b)
    for (_, (h, w)), members in groups.items():
        index = torch.as_tensor(members, device=device)
        features = [to_device(maps[b], device, WORK) for b in members]
        features = features[0][None] if len(members) == 1 else torch.stack(features)
        rows = None if prototype_rows is None else [prototype_rows[b] for b in members]
        protos = None if rows is None or all(r is None for r in rows) else _padded_rows(rows, g_max, features.shape[1], device)
        yield index, h * w, features, weights[index, :, : h * w].reshape(len(members), g_max, h, w), protos


def _padded_rows(rows: list, g_max: int, d: int, device) -> torch.Tensor:
    """Per-image prototype rows (G_b x D numpy, or None) as ``[B, g_max, D]``; a missing or
    padded row is zero: that class keeps its own centroid."""
    out = torch.zeros(len(rows), g_max, d, dtype=WORK)
    for b, r in enumerate(rows):
        if r is not None:
            out[b, : len(r)] = torch.as_tensor(np.asarray(r), dtype=WORK)
    return to_device(out, device)


def wss_heat_maps(states, grids, weights, cells, needed, clip: float, layer_rows: list, weight: float) -> torch.Tensor:
    """Step 3.2 where ``needed``: per WSS layer, CAP and cosine heat maps on the Steps 2-3 grid,
    min-max; the layers averaged; min-max again. ``[B, G, N]``; images not needed get zeros
    (their WSS maps would not be used). ``layer_rows``: per image, its classes' prototypes per
    WSS layer (or None), blended into the layer's centroids with ``weight``."""
    device = weights.device
    total = torch.zeros_like(weights)
    chosen = [b for b in range(len(states)) if needed[b]]
    for index in range(max(len(states[b].wss) for b in chosen)):
        members = [b for b in chosen if index < len(states[b].wss)]
        rows = [None if layer_rows[b] is None else layer_rows[b][index] for b in members]
        maps, _ = grid_heat_maps([states[b].wss[index] for b in members], [grids[b] for b in members],
                                 weights[members], clip=clip, prototype_rows=rows, weight=weight)
        total[members] += maps
    layers = torch.as_tensor([len(s.wss) if needed[b] else 1 for b, s in enumerate(states)], dtype=WORK, device=device)
    return minmax(total / layers[:, None, None], -1, clip, valid=cells[:, None, :])


def rebalance_heat(states: list[ImageState], params: DHRParams, crfs: ImageCRFs | None = None) -> None:
    """Steps 2-3.4: the heat maps H (G x h x w on each image's feature grid) and the groups.

    Step 2: CAP of the USS features over M_init, cosine heat maps (ours: the CAP support
    weighted by the class posterior, centroids blended with class prototypes, the WSS maps
    mixed in). Step 3: groups of classes whose USS centroids correlate above tau,
    ``H[G] *= f_OT(S_ws[G])`` per group, ``H *= f_OT(H)``, min-max (ours: again with the class
    sizes of the previous answer, ``params.size_passes`` times). Fills ``state.heat`` and
    ``state.groups`` (class ids).
    """
    steps, clip = params.steps, params.ot.minmax_clip
    grids = [feature_grid(s, params) for s in states]
    counts = [len(s.classes) for s in states]
    weights, cells = cell_fractions([s.init for s in states], [s.classes for s in states], grids, mode=params.cap.value)
    rows = [prototype_rows(s, params) for s in states]  # ours: (USS, WSS layers) per image, or None
    uss_rows = [r for r, _ in rows]
    if params.weighs_support:  # ours: every CAP below pools over the posterior-weighted support
        weights = grid_support([s.uss for s in states], grids, weights, cells, counts, temperature=params.support_temperature,
                               prior=params.support_prior, prototype_rows=uss_rows, weight=params.prototype_weight)
    heat = centroids = None
    if steps.uss:  # Step 2
        heat, centroids = grid_heat_maps([s.uss for s in states], grids, weights, clip=clip, prototype_rows=uss_rows,
                                         weight=params.prototype_weight)
    groups = correlated_groups(centroids, counts, params.tau) if uses_groups(params) else [[] for _ in states]  # Step 3.1
    needed = [needs_wss_maps(g, params) for g in groups]
    s_ws = None
    if any(needed):  # Step 3.2
        s_ws = wss_heat_maps(states, grids, weights, cells, needed, clip, [w for _, w in rows], params.prototype_weight)
    if heat is None:  # Table 6 row 6: WSS alone
        heat = s_ws
    elif mixes_wss(params):  # ours: the WSS maps mixed into Step 2's
        w = params.wss_heat_weight
        heat = minmax((1.0 - w) * heat + w * s_ws, -1, clip, valid=cells[:, None, :])
    out = class_transports(states, groups, heat, s_ws, cells, grids, [s.init_counts for s in states], params)
    for _ in range(params.size_pass_count):  # ours: again, with the class sizes of the previous answer
        out = class_transports(states, groups, heat, s_ws, cells, grids, answer_counts(states, grids, out), params)
    for b, (s, grid, g) in enumerate(zip(states, grids, groups)):
        s.heat = out[b, : counts[b], : grid[0] * grid[1]].reshape(counts[b], *grid)
        s.groups = [s.classes[m].tolist() for m in g]
        s.warnings = list(dict.fromkeys(s.warnings))  # the passes may note one OT problem again


def class_transports(states, groups, heat, s_ws, cells, grids, sizes, params: DHRParams) -> torch.Tensor:
    """Steps 3.3-3.4 over a batch: ``H[G] *= f_OT(S_ws[G])`` per WSS group, ``H *= f_OT(H)``,
    min-max; the ``area`` marginals count ``sizes[b]`` (pixels per class id). Returns the new
    ``[B, G, N]`` (``heat`` is not modified); unconverged OT calls are noted on the states."""
    device = heat.device
    plans = [rebalance_transports(s, g, params, size) for s, g, size in zip(states, groups, sizes)]
    cells_of = [h * w for h, w in grids]
    counts = [len(s.classes) for s in states]
    problems = [(b, call) for b, (calls, _) in enumerate(plans) for call in calls]  # Step 3.3
    if problems:
        slots = [torch.as_tensor(call.slots, device=device) for _, call in problems]
        scores = [s_ws[b, index, : cells_of[b]] for (b, _), index in zip(problems, slots)]
        values, notes = transport(scores, [call for _, call in problems], params.ot, params.marginal_kl)
        heat = heat.clone()
        for (b, _), index, value, note in zip(problems, slots, values, notes):
            heat[b, index, : cells_of[b]] = heat[b, index, : cells_of[b]] * value
            states[b].warnings += [note] if note else []
    finals = [heat[b, :g, : cells_of[b]] for b, g in enumerate(counts)]  # Step 3.4
    values, notes = transport(finals, [final for _, final in plans], params.ot, params.marginal_kl)
    factor = torch.zeros_like(heat)
    for b, (value, note) in enumerate(zip(values, notes)):
        factor[b, : value.shape[0], : value.shape[1]] = value
        states[b].warnings += [note] if note else []
    valid = cells[:, None, :] & length_mask(counts, heat.shape[1], device)[:, :, None]
    return minmax(heat * factor, -1, clip=params.ot.minmax_clip, valid=valid)


def answer_counts(states: list[ImageState], grids: list[tuple[int, int]], heat: torch.Tensor) -> list[np.ndarray]:
    """Pixels per class id (0..255) of each image's answer without a CRF: the argmax of its H
    upsampled to the image (bilinear, float32 as :func:`final_mask` upsamples). One host copy
    for the batch."""
    counts = []
    for b, (s, (h, w)) in enumerate(zip(states, grids)):
        g = len(s.classes)
        up = resize(heat[b, :g, : h * w].reshape(g, h, w).to(torch.float32), s.size)
        ids = torch.as_tensor(s.classes, device=heat.device)[up.argmax(dim=0)]
        counts.append(torch.bincount(ids.reshape(-1), minlength=256))
    host = to_host(torch.stack(counts))
    return list(host)


def final_mask(states: list[ImageState], params: DHRParams, crfs: ImageCRFs | None) -> None:
    """Step 3.5: H upsampled to each image (bilinear), the second DenseCRF (the argmax of H
    without one), class ids; ours: a colour posterior mixed into H before the CRF
    (``colour_weight``, where the image is given), then the guard (over H) and ignore-below.

    Fills ``mask`` (M_dh) and ``confidence`` (the CRF's maximum marginal per pixel; None without
    a CRF).
    """
    ups = [resize(s.heat.to(torch.float32), s.size) for s in states]  # float32, as the CRF takes it (seed.seed_channels)
    w = params.colour_weight
    probs = [up if w == 0 or s.image is None else (1.0 - w) * up + w * colour_posterior(s.image, up) for s, up in zip(states, ups)]
    marginals = crfs.marginals(probs) if crfs is not None else None
    for b, (s, up) in enumerate(zip(states, ups)):
        classes = torch.as_tensor(s.classes, device=up.device)
        confidence, winner = (marginals[b].max(dim=0) if marginals is not None else (None, probs[b].argmax(dim=0)))
        mask = classes[winner].to(torch.uint8)
        if params.guard > 0:
            mask = guard_vanished(mask, s.init, classes, params.guard, max_share=params.guard_max_share,
                                  support=up, threshold=params.guard_support)
        if params.ignore_below > 0 and confidence is not None:
            mask = torch.where(confidence < params.ignore_below, IGNORE, mask).to(torch.uint8)
        s.mask, s.confidence = mask, confidence


#: RGB cells per channel of :func:`colour_posterior` (16^3 cells; 8 and 32 scored alike).
COLOUR_BINS = 16
#: Fixed-point scale of the heat weights in its histograms: integer sums are exact in any order
#: (a device's atomic float adds are not), so a mask does not depend on its batch or device.
_HEAT_SCALE = 2**24


def colour_posterior(image: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Each pixel's posterior over Gamma under a colour model of the classes pooled from the
    image itself (ours, 0.5; ``colour_weight``).

    Every pixel's RGB falls in one of ``COLOUR_BINS ** 3`` cells. Class k's histogram counts the
    pixels where k wins the upsampled heat maps ``up``, each weighted by its heat; every
    histogram is normalised (classes count alike, not by size) and smoothed by one pixel's
    worth spread over the cells; then ``P(k | cell) = h_k[cell] / sum_j h_j[cell]``. The DenseCRF
    sees colour only pairwise (neighbours of similar colour agree); this is a unary term at
    full resolution, for thin classes the feature grids do not resolve.

    Parameters
    ----------
    image : tensor, shape (H, W, 3), uint8
    up : tensor, shape (G, H, W), float
        H upsampled to the image, in [0, 1].

    Returns
    -------
    tensor, shape (G, H, W), the dtype of ``up``; sums to 1 over G at every pixel.

    Examples
    --------
    >>> image = torch.tensor([[[0, 0, 0], [0, 0, 0], [250, 250, 250]]], dtype=torch.uint8)
    >>> up = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 1.0, 1.0]]])
    >>> [round(v, 4) for v in colour_posterior(image, up)[:, 0, 0].tolist()]  # (1 + 1/4096) / (1.5 + 2/4096)
    [0.6666, 0.3334]
    """
    g, n = up.shape[0], COLOUR_BINS**3
    q = image.long() * COLOUR_BINS // 256
    cell = ((q[..., 0] * COLOUR_BINS + q[..., 1]) * COLOUR_BINS + q[..., 2]).reshape(-1)
    heat, winner = up.reshape(g, -1).max(dim=0)
    weights = (heat.double() * _HEAT_SCALE).round().long()
    hist = torch.zeros(g * n, dtype=torch.int64, device=up.device).index_add_(0, winner * n + cell, weights)
    hist = hist.reshape(g, n).double()
    hist = hist / hist.sum(dim=1, keepdim=True).clamp(min=1.0) + 1.0 / n
    posterior = hist / hist.sum(dim=0, keepdim=True)
    return posterior[:, cell].reshape(up.shape).to(up.dtype)


def guard_vanished(
    mask: torch.Tensor, init: torch.Tensor, classes: torch.Tensor, ratio: float, *, max_share: float = 1.0,
    support: torch.Tensor | None = None, threshold: float = 0.0,
) -> torch.Tensor:
    """Restore M_init's region of a minor class that rebalancing made vanish (our addition).

    A class k of M_init covering less than ``max_share`` of M_init's labelled pixels vanished
    when ``|{mask = k} & {init = k}| < ratio * |{init = k}|``; its M_init region is then
    written back, as Step 1 restores lost tags into the base mask. With ``threshold`` > 0 only
    the pixels of that region where the class's own heat map (``support[slot]``, G x H x W, the
    upsampled H) reaches ``threshold`` are written back: M_init's region of a minor class is
    often a blob two to five times the object; its heat map marks the part that looks like the
    class. The M_init regions are disjoint, so the order of classes does not matter.

    Parameters
    ----------
    mask, init : tensor, shape (H, W), uint8
        M_dh and M_init.
    classes : tensor, shape (G,)
        The class ids of the heat map's rows (Gamma).
    ratio, max_share, threshold : float
    support : tensor, shape (G, H, W), optional

    Returns
    -------
    tensor, shape (H, W), uint8
        A new mask (the input is not modified).

    Examples
    --------
    >>> init = torch.tensor([[0, 0, 1, 1]], dtype=torch.uint8)
    >>> mask = torch.tensor([[0, 0, 0, 1]], dtype=torch.uint8)
    >>> guard_vanished(mask, init, torch.tensor([0, 1]), 0.6).tolist()
    [[0, 0, 1, 1]]
    """
    ids = init.reshape(-1).long()
    sizes = torch.bincount(ids, minlength=256).double()
    kept = torch.bincount(ids, weights=(mask.reshape(-1) == init.reshape(-1)).double(), minlength=256)  # exact counts
    labelled = sizes.sum() - sizes[IGNORE]
    rows = classes.to(init.device).long()
    guarded = (sizes[rows] > 0) & (sizes[rows] < max_share * labelled) & (kept[rows] < ratio * sizes[rows])
    table = torch.zeros(256, dtype=torch.bool, device=init.device)
    table[rows] = guarded
    restore = table[init.long()]
    if threshold > 0 and support is not None:  # the heat of each pixel's own M_init class
        slot = torch.zeros(256, dtype=torch.long, device=init.device)
        slot[rows] = torch.arange(len(rows), device=init.device)
        restore &= support.gather(0, slot[init.long()][None])[0] >= threshold
    return torch.where(restore, init, mask)
