"""Steps 2-3.4 (the HEAT_MAPS stage) with hooks where an oracle replaces a piece.

:func:`rebalance_heat` is the orchestration of ``dhr_label.core.rebalance.rebalance_heat``
(about 25 lines) calling the package's own functions for every computation (``cell_fractions``,
``grid_support``, ``grid_heat_maps``, ``correlated_groups``, ``wss_heat_maps``,
``class_transports``, ``answer_counts``). It is a copy because the package's stage computes
the CAP support and reads the prototype rows inside one function, with no seam between them
and the heat maps; with no hooks it gives the package's heat maps exactly (``check.py``
asserts it on every image). A hook replaces one piece:

- ``support(states, grids, weights)``: the CAP weights ``[B, G, N]`` every centroid is pooled
  with (USS and each WSS layer), after the package's (posterior-weighted) support;
- ``rows(states, rows)``: the prototype rows the heat maps blend (per image: USS rows, WSS
  rows per layer, as ``pipeline.prototype_rows``); the posterior support keeps the package's.

The class sizes of the area marginal need no hook: they are ``state.init_counts`` (first
pass) and the previous answer's (``params.size_passes`` more).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dhr_label.core.cap import cell_fractions, correlated_groups, minmax
from dhr_label.core.pipeline import ImageState, feature_grid, mixes_wss, needs_wss_maps, prototype_rows, uses_groups
from dhr_label.core.rebalance import answer_counts, class_transports, grid_heat_maps, grid_support, wss_heat_maps
from dhr_label.params import DHRParams


@dataclass(frozen=True)
class Hooks:
    """The pieces of Steps 2-3 a variant replaces (None: the package's)."""

    support: Callable | None = None
    rows: Callable | None = None


def rebalance_heat(states: list[ImageState], params: DHRParams, crfs=None, hooks: Hooks = Hooks()) -> None:
    """The package's HEAT_MAPS stage with ``hooks``: fills ``state.heat`` and ``state.groups``.

    Parameters
    ----------
    states : list of ImageState
        Resumed after Step 1 (``state.next`` is HEAT_MAPS).
    params : DHRParams
    crfs : unused
        The stage signature of ``dhr_label.core.stages.STAGES``.
    hooks : Hooks
    """
    steps, clip = params.steps, params.ot.minmax_clip
    grids = [feature_grid(s, params) for s in states]
    counts = [len(s.classes) for s in states]
    weights, cells = cell_fractions([s.init for s in states], [s.classes for s in states], grids, mode=params.cap.value)
    rows = [prototype_rows(s, params) for s in states]
    if params.weighs_support:
        weights = grid_support([s.uss for s in states], grids, weights, cells, counts, temperature=params.support_temperature,
                               prior=params.support_prior, prototype_rows=[r for r, _ in rows], weight=params.prototype_weight)
    if hooks.support is not None:
        weights = hooks.support(states, grids, weights)
    if hooks.rows is not None:
        rows = hooks.rows(states, rows)
    heat = centroids = None
    if steps.uss:
        heat, centroids = grid_heat_maps([s.uss for s in states], grids, weights, clip=clip, prototype_rows=[r for r, _ in rows],
                                         weight=params.prototype_weight)
    groups = correlated_groups(centroids, counts, params.tau) if uses_groups(params) else [[] for _ in states]
    needed = [needs_wss_maps(g, params) for g in groups]
    s_ws = None
    if any(needed):
        s_ws = wss_heat_maps(states, grids, weights, cells, needed, clip, [w for _, w in rows], params.prototype_weight)
    if heat is None:
        heat = s_ws
    elif mixes_wss(params):
        w = params.wss_heat_weight
        heat = minmax((1.0 - w) * heat + w * s_ws, -1, clip, valid=cells[:, None, :])
    out = class_transports(states, groups, heat, s_ws, cells, grids, [s.init_counts for s in states], params)
    for _ in range(params.size_pass_count):
        out = class_transports(states, groups, heat, s_ws, cells, grids, answer_counts(states, grids, out), params)
    for b, (s, grid, g) in enumerate(zip(states, grids, groups)):
        s.heat = out[b, : counts[b], : grid[0] * grid[1]].reshape(counts[b], *grid)
        s.groups = [s.classes[m].tolist() for m in g]
        s.warnings = list(dict.fromkeys(s.warnings))
