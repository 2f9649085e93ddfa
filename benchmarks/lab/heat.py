"""Steps 2-3 of main (``dhr_label.core.dhr.rebalance_heat``) with the pieces an idea replaces.

:func:`rebalance_heat` is main's computation line for line; with no ``Hooks`` it returns the
same heat maps (checked by ``run.py --check``). A hook replaces one piece:

- ``weights(grid, default)``: the CAP weights (G x N on the USS grid) every centroid is pooled
  with (USS and each WSS layer) -- where a class's centroid support comes from;
- ``centroids(features, weights, protos, source)``: the G x D centroids of one feature source
  (0 = USS, 1.. = the WSS layers) -- the estimator;
- ``term(grid)``: a (G x N map in [0, 1], weight) mixed into Step 2's heat maps before the
  Step-3 groups, as the WSS maps are -- a heat-map term.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dhr_label.core.cap import blend_centroids, class_cell_fractions, class_centroids, cosine_maps, minmax, minmax_rows
from dhr_label.core.dhr import transport
from dhr_label.core.pipeline import ImageState, feature_grid, mixes_wss, needs_wss_maps, prototype_rows, rebalance_transports, wss_groups
from dhr_label.core.resize import resize_bilinear
from dhr_label.params import DHRParams


@dataclass(frozen=True)
class Hooks:
    weights: Callable | None = None
    centroids: Callable | None = None
    term: Callable | None = None
    marginal_mask: np.ndarray | None = None  # the mask the area marginal counts (default M_init)
    final_ot: bool = True  # False: stop before Step 3.4's OT (H = the mixed heat maps, min-max)
    shares: Callable | None = None  # (class ids, counts on the marginal mask) -> the class marginal
    kl: bool = False  # the area marginal KL-relaxed (weight params.marginal_kl)


def blended(features: np.ndarray, weights: np.ndarray, protos: np.ndarray | None, blend: float) -> np.ndarray:
    """Main's centroid: CAP mean, blended with the prototype (``heat_maps``' first lines)."""
    centroids, present = class_centroids(features, weights)
    if protos is not None and blend > 0:
        centroids = blend_centroids(centroids, present, protos, blend)
    return centroids


def maps_of(features: np.ndarray, centroids: np.ndarray, clip: float) -> np.ndarray:
    """Main's heat maps of given centroids: cosine, min-max per class, 0 for a zero centroid."""
    present = (centroids * centroids).sum(-1) > 0
    return np.where(present[:, None], minmax(cosine_maps(features, centroids), -1, clip), 0.0).astype(np.float32)


def source_maps(features, weights, protos, blend, clip, hooks: Hooks, source: int):
    if hooks.centroids is not None:
        centroids = hooks.centroids(features, weights, protos, source)
    else:
        centroids = blended(features, weights, protos, blend)
    return maps_of(features, centroids, clip), centroids


def rebalance_heat(state: ImageState, params: DHRParams, hooks: Hooks = Hooks()) -> np.ndarray:
    """Steps 2-3.4 as main computes them, with ``hooks``; G x h x w heat maps in [0, 1]."""
    steps, clip = params.steps, params.ot.minmax_clip
    grid = feature_grid(state, params)
    weights = class_cell_fractions(state.init, state.classes, grid, mode=params.cap.value)
    if hooks.weights is not None:
        weights = hooks.weights(grid, weights)
    uss_protos, wss_protos = prototype_rows(state, params)
    blend = params.prototype_weight
    heat = centroids = None
    if steps.uss:
        heat, centroids = source_maps(state.uss.reshape(state.uss.shape[0], -1), weights, uss_protos, blend, clip, hooks, 0)
    groups = wss_groups(state, centroids, params)
    s_ws = None
    if needs_wss_maps(groups, params):
        total = np.zeros(weights.shape, dtype=np.float32)
        for index, layer in enumerate(state.wss):
            resized = resize_bilinear(layer, grid)
            proto = None if wss_protos is None else wss_protos[index]
            maps, _ = source_maps(resized.reshape(layer.shape[0], -1), weights, proto, blend, clip, hooks, index + 1)
            total += maps
        s_ws = minmax_rows(total / len(state.wss), clip)
    if heat is None:
        heat = s_ws
    elif mixes_wss(params):
        heat = minmax_rows((1.0 - params.wss_heat_weight) * heat + params.wss_heat_weight * s_ws, clip)
    if hooks.term is not None:
        extra, weight = hooks.term(grid)
        if weight > 0:
            heat = minmax_rows((1.0 - weight) * heat + weight * extra, clip)
    if not hooks.final_ot:
        return heat.reshape(len(state.classes), *grid)
    if hooks.marginal_mask is not None:
        saved, state.init = state.init, hooks.marginal_mask
        calls, final = rebalance_transports(state, groups, params)
        state.init = saved
    else:
        calls, final = rebalance_transports(state, groups, params)
    if hooks.shares is not None:
        mask = state.init if hooks.marginal_mask is None else hooks.marginal_mask
        counts = np.bincount(mask.ravel(), minlength=256).astype(np.float64)
        calls = [dataclasses.replace(c, marginal=hooks.shares(state.classes[c.slots], counts[state.classes[c.slots]]))
                 for c in calls]
        final = dataclasses.replace(final, marginal=hooks.shares(state.classes, counts[state.classes]))
    if hooks.kl:
        calls = [dataclasses.replace(c, kl=True) for c in calls]
        final = dataclasses.replace(final, kl=True)
    for call in calls:
        heat[call.slots] = heat[call.slots] * transport(s_ws[call.slots], call, params)
    heat = minmax_rows(heat * transport(heat, final, params), clip)
    return heat.reshape(len(state.classes), *grid)
