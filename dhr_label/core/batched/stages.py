"""The four stages of :mod:`~dhr_label.core.pipeline` for a batch of images, in torch.

Each function takes the states that are at that stage and fills in what the stage adds, as
``core.dhr`` does for one image; the decisions (transports, groups, which maps are needed)
come from the pipeline, so the two executors cannot drift apart. Images differ in size, tags,
classes and feature grids: maps are padded into one tensor with masks of what is real, and
the per-image parts (upsampling to each image's size) loop over the batch.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ...params import DHRParams
from ..cap import heat_maps, minmax
from ..pipeline import (
    IGNORE,
    ImageState,
    feature_grid,
    guard_vanished,
    mixes_wss,
    needs_wss_maps,
    prototype_rows,
    rebalance_transports,
    seed_transport,
    wss_groups,
)
from .sinkhorn import transport
from .tensors import WORK, as_tensor, length_mask, pad_stack


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``C x h x w`` to ``C x H x W`` float32, bilinear, ``align_corners=False`` (as core.resize)."""
    maps = maps.float()
    if tuple(maps.shape[1:]) == tuple(size):
        return maps
    return F.interpolate(maps[None], size=tuple(size), mode="bilinear", align_corners=False)[0]


# --------------------------------------------------------------------------------------------
# Step 1
# --------------------------------------------------------------------------------------------
def seed_scores(states: list[ImageState], params: DHRParams, device, crf=None) -> None:
    """Step 1.1-1.2: ReLU, per-channel max normalisation, ``A * f_OT(A)`` (K x h x w each)."""
    flat = [as_tensor(s.cam, device, WORK).reshape(len(s.labels), -1) for s in states]
    a, shapes = pad_stack(flat, device)  # [B, K, N]; the padding is 0, which ReLU'd maxima ignore
    a = a.clamp(min=0.0)
    a = a / a.amax(dim=2, keepdim=True).clamp(min=1e-5)
    scores = [a[b, :k, :n] for b, (k, n) in enumerate(shapes)]
    values, notes = transport(scores, [seed_transport(s, params) for s in states], params.ot, params.marginal_kl)
    for s, score, value, note in zip(states, scores, values, notes):
        s.scores = (score * value).reshape(tuple(s.cam.shape))
        s.warnings += [note] if note else []


def seed_mask(states: list[ImageState], params: DHRParams, device, crf=None) -> None:
    """Step 1.3-1.5: upsample, background score, CRF 1 (argmax without), M_seed, integration."""
    probs, ids = [], []
    for s in states:
        up = upsample(s.scores, s.size)
        tags = torch.as_tensor(s.labels, device=device)
        if s.background is not None:
            bg = (1.0 - up.amax(dim=0, keepdim=True)).clamp(0.0, 1.0) ** params.gamma
            up = torch.cat([bg, up])
            tags = torch.cat([torch.as_tensor([s.background], device=device), tags])
        probs.append(up)
        ids.append(tags)
    marginals = crf.marginals(probs) if params.steps.crf else probs
    for s, q, tags in zip(states, marginals, ids):
        s.seed = tags[q.argmax(dim=0)].to(torch.uint8)
        s.init, s.restored = integrate(s.seed, s.base, s.labels, params.rho, device)


def integrate(seed: torch.Tensor, base, labels: np.ndarray, rho: float, device) -> tuple[torch.Tensor, list[int]]:
    """Step 1.5 on the device, as ``core.dhr.integrate``: restore into M_base the tags whose
    seed region it lost (``|base = k & seed = k| < rho |seed = k|``)."""
    if base is None:
        return seed.clone(), []
    base = as_tensor(base, device)
    tags = torch.as_tensor(labels, device=device)
    in_seed = seed[None] == tags[:, None, None].to(seed.dtype)
    sizes = in_seed.sum(dim=(1, 2))
    kept = (in_seed & (base[None] == tags[:, None, None].to(base.dtype))).sum(dim=(1, 2))
    lost = ((sizes > 0) & (kept < rho * sizes.double())).cpu().numpy()
    if not lost.any():
        return base.clone(), []
    restore = in_seed[torch.as_tensor(lost, device=device)].any(dim=0)
    return torch.where(restore, seed, base), labels[lost].tolist()


# --------------------------------------------------------------------------------------------
# Steps 2-3
# --------------------------------------------------------------------------------------------
def cell_fractions(states: list[ImageState], grids: list[tuple[int, int]], mode: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """CAP weights ``[B, G, N]`` of :func:`cap.class_cell_fractions` and the valid cells ``[B, N]``.

    One integer count over every pixel of the batch, pixel -> (image, class slot, cell), where
    unlabelled pixels go to an extra slot G and padding to an extra cell N (integer sums: exact
    and the same whatever order the device adds them in).
    """
    g_max = max(len(s.classes) for s in states)
    n_max = max(h * w for h, w in grids)
    per_image = (g_max + 1) * (n_max + 1)
    index = []
    for b, (s, (gh, gw)) in enumerate(zip(states, grids)):
        height, width = s.init.shape
        lookup = torch.full((256,), g_max, dtype=torch.int64, device=device)
        lookup[torch.as_tensor(s.classes, device=device)] = torch.arange(len(s.classes), device=device)
        slot = lookup[as_tensor(s.init, device).long()]
        rows = (torch.arange(height, device=device) * gh) // height
        cols = (torch.arange(width, device=device) * gw) // width
        index.append((b * per_image + slot * (n_max + 1) + rows[:, None] * gw + cols[None, :]).reshape(-1))
    counts = torch.bincount(torch.cat(index), minlength=len(states) * per_image)
    counts = counts.reshape(len(states), g_max + 1, n_max + 1)[:, :, :n_max].to(WORK)
    per_cell = counts.sum(dim=1)  # every pixel of a cell, labelled or not
    counts = counts[:, :g_max]
    cells = length_mask([h * w for h, w in grids], n_max, device)
    if mode == "soft":
        return counts / per_cell.clamp(min=1.0)[:, None, :], cells
    labelled = counts.sum(dim=1)
    top, winner = counts.max(dim=1)  # the first maximum: the lower class id, as numpy
    wins = (top >= per_cell - labelled) & (labelled > 0)
    weights = F.one_hot(winner, g_max).transpose(1, 2).to(WORK)
    return weights * wins[:, None, :], cells


def _features(maps: list, grids: list[tuple[int, int]], device) -> torch.Tensor:
    """Feature maps resized to each image's grid and flattened, padded to ``[B, D, N]``."""
    flat = []
    for m, grid in zip(maps, grids):
        m = as_tensor(m, device, WORK)
        if tuple(m.shape[1:]) != tuple(grid):
            m = F.interpolate(m[None], size=tuple(grid), mode="bilinear", align_corners=False)[0]
        flat.append(m.reshape(m.shape[0], -1))
    return pad_stack(flat, device)[0]


def _prototypes(rows: list, g_max: int, device) -> torch.Tensor | None:
    """Per-image prototype rows (G_b x D numpy, or None) padded to ``[B, g_max, D]``; None when
    no image has any. A missing or padded row is zero: that class keeps its own centroid."""
    if all(r is None for r in rows):
        return None
    d = next(r for r in rows if r is not None).shape[1]
    padded = pad_stack([np.zeros((0, d), np.float32) if r is None else r for r in rows], device)[0]
    return F.pad(padded, (0, 0, 0, g_max - padded.shape[1]))


def wss_heat(states, grids, weights, cells, needed, clip: float, device, layer_rows: list, weight: float) -> torch.Tensor:
    """Step 3.2 where ``needed``: per layer, resize to the grid, CAP, cosine, min-max; average;
    min-max. Images not needed get zeros (their WSS maps would not be used). ``layer_rows``: per
    image, its classes' prototypes per WSS layer (or None), blended in with ``weight``."""
    total = torch.zeros_like(weights)
    chosen = [b for b in range(len(states)) if needed[b]]
    for index in range(max(len(states[b].wss) for b in chosen)):
        members = [b for b in chosen if index < len(states[b].wss)]
        features = _features([states[b].wss[index] for b in members], [grids[b] for b in members], device)
        rows = [None if layer_rows[b] is None else layer_rows[b][index] for b in members]
        protos = _prototypes(rows, weights.shape[1], device)
        maps, _ = heat_maps(features, weights[members], clip=clip, cells=cells[members][:, None, :],
                            prototypes=protos, weight=weight)
        total[members] += maps
    layers = torch.as_tensor([len(s.wss) if needed[b] else 1 for b, s in enumerate(states)], dtype=WORK, device=device)
    return minmax(total / layers[:, None, None], -1, clip, valid=cells[:, None, :])


def heat_maps_stage(states: list[ImageState], params: DHRParams, device, crf=None) -> None:
    """Steps 2-3.4: the heat maps H (G x h x w on each image's feature grid) and the groups."""
    steps, clip = params.steps, params.ot.minmax_clip
    grids = [feature_grid(s, params) for s in states]
    weights, cells = cell_fractions(states, grids, params.cap.value, device)
    rows = [prototype_rows(s, params) for s in states]  # ours: (USS, WSS layers) per image, or None
    heat = centroids = None
    if steps.uss:
        features = _features([s.uss for s in states], grids, device)
        protos = _prototypes([uss_rows for uss_rows, _ in rows], weights.shape[1], device)
        heat, centroids = heat_maps(features, weights, clip=clip, cells=cells[:, None, :], prototypes=protos, weight=params.prototype_weight)
        centroids = centroids.float().cpu().numpy()
    groups = [wss_groups(s, None if centroids is None else centroids[b, : len(s.classes)], params) for b, s in enumerate(states)]
    needed = [needs_wss_maps(g, params) for g in groups]
    layer_rows = [wss_rows for _, wss_rows in rows]
    s_ws = wss_heat(states, grids, weights, cells, needed, clip, device, layer_rows, params.prototype_weight) if any(needed) else None
    if heat is None:  # Table 6 row 6: WSS alone
        heat = s_ws
    elif mixes_wss(params):  # ours: the WSS maps mixed into Step 2's
        w = params.wss_heat_weight
        heat = minmax((1.0 - w) * heat + w * s_ws, -1, clip, valid=cells[:, None, :])
    plans = [rebalance_transports(s, g, params) for s, g in zip(states, groups)]
    cells_of = [h * w for h, w in grids]
    problems = [(b, call) for b, (calls, _) in enumerate(plans) for call in calls]  # Step 3.3
    if problems:
        scores = [s_ws[b, torch.as_tensor(call.slots, device=device), : cells_of[b]] for b, call in problems]
        values, notes = transport(scores, [call for _, call in problems], params.ot, params.marginal_kl)
        for (b, call), value, note in zip(problems, values, notes):
            slots = torch.as_tensor(call.slots, device=device)
            heat[b, slots, : cells_of[b]] = heat[b, slots, : cells_of[b]] * value
            states[b].warnings += [note] if note else []
    finals = [heat[b, : len(s.classes), : cells_of[b]] for b, s in enumerate(states)]  # Step 3.4
    values, notes = transport(finals, [final for _, final in plans], params.ot, params.marginal_kl)
    factor = torch.zeros_like(heat)
    for b, (value, note) in enumerate(zip(values, notes)):
        factor[b, : value.shape[0], : value.shape[1]] = value
        states[b].warnings += [note] if note else []
    classes = length_mask([len(s.classes) for s in states], heat.shape[1], device)
    heat = minmax(heat * factor, -1, clip, valid=cells[:, None, :] & classes[:, :, None])
    for b, (s, grid, g) in enumerate(zip(states, grids, groups)):
        s.heat = heat[b, : len(s.classes), : cells_of[b]].reshape(len(s.classes), *grid)
        s.groups = [s.classes[m].tolist() for m in g]


def final_mask(states: list[ImageState], params: DHRParams, device, crf=None) -> None:
    """Step 3.5: H upsampled to each image, CRF 2, class ids; the guard and ignore-below."""
    ups = [upsample(s.heat, tuple(s.init.shape)) for s in states]
    marginals = crf.marginals(ups)
    for s, q, up in zip(states, marginals, ups):
        confidence, winner = q.max(dim=0)
        mask = torch.as_tensor(s.classes, device=device)[winner].to(torch.uint8)
        if params.guard > 0:  # rare and cheap: on the host, with the numpy core's function
            host = guard_vanished(mask.cpu().numpy(), as_tensor(s.init, "cpu").numpy(), s.classes, params.guard,
                                  params.guard_max_share, lambda slot, up=up: up[slot].cpu().numpy(), params.guard_support)
            mask = torch.as_tensor(host, device=device)
        if params.ignore_below > 0:
            mask = torch.where(confidence < params.ignore_below, IGNORE, mask).to(torch.uint8)
        s.mask, s.confidence = mask, confidence
