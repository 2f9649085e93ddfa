"""The recommended per-image class model for Steps 2-3, as small pure functions to port.

Two changes to 0.4's Steps 2-3, both inside the HEAT_MAPS stage, both per image, no new
dataset-level state (the prototypes stay the ones refine pools from the base masks):

1. :func:`soft_support` -- *where each class's centroid support comes from*. 0.4 pools every
   class's centroid (USS and each WSS layer) over M_init's soft cell fractions ``f``. Here each
   cell's fraction is first weighted by how much the cell looks like that class rather than the
   image's other classes: ``w_k(n) = (f_k(n) + prior) * P(k | x_n)``, ``P`` the softmax over
   Gamma of the cosines of USS cell ``x_n`` to 0.4's (prototype-blended) USS centroids, at
   ``temperature``. The cells of a coarse M_init blob that look like a neighbour leave the
   class's centroid (an E-step of a mixture over the image's classes, with M_init as the spatial
   prior); ``prior`` lets a cell outside the class's M_init region count a little when it looks
   like the class. These weights replace ``class_cell_fractions(init, ...)`` for every CAP of
   Steps 2-3 (USS, the WSS layers); the WSS groups (Step 3.1) follow from the new USS centroids.

2. :func:`own_size_passes` -- *the class sizes of the final OT*. 0.4's area marginal counts
   each class's pixels in M_init, whose class sizes are off by large factors (CCP: a median 1/200
   for dress, 17x for shoes). Here Steps 3.3-3.4 (the OT calls, the last min-max) run once with
   M_init's counts, then ``passes`` more times with the counts of the previous answer (the
   argmax of its bilinearly upsampled H, the image's resolution); same floor, same
   renormalisation. Only the OT calls are repeated: the centroids, the cosine maps, the WSS maps
   and the groups do not depend on the marginal.

Parameters (defaults measured in benchmarks/lab/FINDINGS.md): ``temperature`` 0.05,
``prior`` 0.1, ``passes`` 2. ``temperature`` -> inf with ``prior`` 0 and ``passes`` 0 is 0.4.
"""
from __future__ import annotations

import numpy as np

from dhr_label.core.cap import blend_centroids, class_centroids, cosine_maps, minmax_rows
from dhr_label.core.dhr import transport
from dhr_label.core.pipeline import Transport, class_marginal
from dhr_label.core.resize import resize_bilinear
from dhr_label.params import DHRParams


def soft_support(features: np.ndarray, fractions: np.ndarray, prototypes: np.ndarray | None, weight: float,
                 temperature: float = 0.05, prior: float = 0.1) -> np.ndarray:
    """CAP weights of Gamma's classes: M_init's fractions times each class's posterior at the cell.

    Parameters
    ----------
    features : (D, N) array
        The image's USS cells (any norm: cosines).
    fractions : (G, N) array
        M_init's soft CAP fractions of Gamma's classes on the USS grid
        (``class_cell_fractions(init, classes, grid)``).
    prototypes : (G, D) array or None
        The classes' prototypes (rows of refine's prototypes file), blended as 0.4 blends.
    weight : float
        ``prototype_weight`` (0.75).
    temperature : float > 0
        Of the softmax over Gamma of the cosines to the centroids (cosines lie in [-1, 1]).
    prior : float >= 0
        Added to every class's fraction before the posterior weighting (0: a class's support
        stays inside its M_init region).

    Returns
    -------
    (G, N) float32: ``(fractions + prior) * softmax_k(cos(x_n, c_k) / temperature)``, with
    ``c_k`` 0.4's centroid (CAP mean over ``fractions`` blended with the prototype).
    """
    local, present = class_centroids(features, fractions)
    centroids = blend_centroids(local, present, prototypes, weight) if prototypes is not None and weight > 0 else local
    z = cosine_maps(features, centroids) / temperature
    post = np.exp(z - z.max(axis=0, keepdims=True))
    post /= post.sum(axis=0, keepdims=True)
    return ((fractions + prior) * post).astype(np.float32)


def own_size_passes(heat: np.ndarray, s_ws: np.ndarray | None, groups: list[list[int]], classes: np.ndarray,
                    init: np.ndarray, grid: tuple[int, int], params: DHRParams, passes: int = 2) -> np.ndarray:
    """Steps 3.3-3.4 with the area marginal counted on M_init, then on the previous answer.

    Parameters
    ----------
    heat : (G, N) float32
        Step 2's heat maps before Step 3.3 (after the WSS mix), on the grid.
    s_ws : (G, N) float32 or None
        The WSS heat maps (Step 3.2), needed when ``groups`` is not empty.
    groups : list of slot lists
        The WSS groups of Step 3.1 (2+ members each).
    classes : (G,) int64, Gamma; init : (H, W) uint8, M_init; grid : the feature grid.
    params : DHRParams (``marginal_rebalance``, ``marginal_floor``, ``ot``).
    passes : int
        Extra passes counting the marginal on the previous answer (0: 0.4).

    Returns
    -------
    (G, h, w) float32, H after Step 3.4 of the last pass.
    """
    clip = params.ot.minmax_clip
    mask = init
    for _ in range(passes + 1):
        def call(slots: np.ndarray) -> Transport:
            marginal, kl = class_marginal(params.marginal_rebalance, classes[slots], mask, params.marginal_floor)
            return Transport(slots, marginal, kl)
        out = heat.copy()
        for group in groups:  # Step 3.3
            slots = np.asarray(group)
            out[slots] = out[slots] * transport(s_ws[slots], call(slots), params)
        every = call(np.arange(len(classes)))
        out = minmax_rows(out * transport(out, every, params), clip)  # Step 3.4
        out = out.reshape(len(classes), *grid)
        mask = classes[np.argmax(resize_bilinear(out, init.shape), axis=0)].astype(np.uint8)
    return out


def rebalance_heat(state, params: DHRParams, temperature: float = 0.05, prior: float = 0.1, passes: int = 2) -> np.ndarray:
    """Steps 2-3.4 of main (``dhr_label.core.dhr.rebalance_heat``) with both changes: where they
    plug in, for the port. Returns H, (G, h, w) float32, the input of Step 3.5 (unchanged)."""
    from dhr_label.core.cap import class_cell_fractions, heat_maps
    from dhr_label.core.dhr import wss_heat_maps
    from dhr_label.core.pipeline import feature_grid, mixes_wss, needs_wss_maps, prototype_rows, wss_groups

    steps, clip = params.steps, params.ot.minmax_clip
    grid = feature_grid(state, params)
    weights = class_cell_fractions(state.init, state.classes, grid, mode=params.cap.value)
    uss_protos, wss_protos = prototype_rows(state, params)
    blend = params.prototype_weight
    heat = centroids = None
    if steps.uss:  # change 1: the support of every CAP below (USS grid)
        features = state.uss.reshape(state.uss.shape[0], -1)
        weights = soft_support(features, weights, uss_protos, blend if params.uses_prototypes else 0.0, temperature, prior)
        heat, centroids = heat_maps(features, weights, clip=clip, prototypes=uss_protos, weight=blend)
    groups = wss_groups(state, centroids, params)
    s_ws = wss_heat_maps(state.wss, grid, weights, clip, wss_protos, blend) if needs_wss_maps(groups, params) else None
    if heat is None:
        heat = s_ws
    elif mixes_wss(params):
        heat = minmax_rows((1.0 - params.wss_heat_weight) * heat + params.wss_heat_weight * s_ws, clip)
    return own_size_passes(heat, s_ws, groups, state.classes, state.init, grid, params, passes)  # change 2
