"""DHR for one image, with numpy and one DenseCRF per image (paper Sec. 3.2, Eqs. 2-4).

:func:`refine` runs the stages of :mod:`~dhr_label.core.pipeline` one by one; the stage
functions below are pure array code that the tests, the benchmarks and ``dhr-label tune`` also
call on their own.
"""
from __future__ import annotations

import time

import numpy as np

from ..params import DHRParams
from .cap import class_cell_fractions, heat_maps, minmax_rows
from .checks import check_image_inputs
from .crf import ImageCRF, image_crf
from .ot import f_ot
from .pipeline import (
    IGNORE,
    ImageState,
    Stage,
    Transport,
    advance,
    feature_grid,
    guard_vanished,
    mixes_wss,
    needs_wss_maps,
    prototype_rows,
    rebalance_transports,
    seed_transport,
    start,
    wss_groups,
)
from .prototypes import Prototypes
from .resize import resize_bilinear

__all__ = ["IGNORE", "refine", "rebalance", "seed_scores", "seed_mask", "integrate", "rebalance_heat", "final_mask"]


def transport(scores: np.ndarray, call: Transport | None, params: DHRParams) -> np.ndarray:
    """``f_OT`` of a ``G x N`` score map over its rows (classes): G x N in [0, 1]."""
    if call is None:
        return np.ones_like(scores)
    kl = params.marginal_kl if call.kl else None
    return f_ot(scores.T, params.ot, col_marginal=call.marginal, kl_weight=kl).T


# --------------------------------------------------------------------------------------------
# Step 1: OT-based seed initialisation and recovery of vanished classes (Eq. 2)
# --------------------------------------------------------------------------------------------
def seed_scores(cam: np.ndarray, call: Transport | None, params: DHRParams) -> np.ndarray:
    """Step 1.1-1.2: ReLU, per-channel max normalisation, then ``A * f_OT(A)`` when ``call``.

    ``call`` is :func:`~dhr_label.core.pipeline.seed_transport` (None: OT off, or K = 1).
    Returns K x h x w float32 in [0, 1].
    """
    k, h, w = cam.shape
    a = np.maximum(cam.astype(np.float32), 0.0)
    a /= np.maximum(a.reshape(k, -1).max(axis=1), 1e-5)[:, None, None]
    if call is not None:
        cells = a.reshape(k, -1)
        a = (cells * transport(cells, call, params)).reshape(k, h, w)
    return a


def seed_probs(
    scores: np.ndarray, labels: np.ndarray, background: int | None, size: tuple[int, int], gamma: float
) -> tuple[np.ndarray, np.ndarray]:
    """Step 1.3: the channels of the first CRF and the class id of each.

    The scores upsampled to the image, after ``bg_score = (1 - max_k A_k) ** gamma`` (CLIP-ES)
    when the dataset has a background; C x H x W float32 and C class ids.
    """
    up = resize_bilinear(scores, size)
    if background is None:
        return up, np.asarray(labels)
    bg = np.power(np.clip(1.0 - up.max(axis=0, keepdims=True), 0.0, 1.0), gamma)
    return np.concatenate([bg, up], axis=0), np.concatenate([[background], labels])


def seed_mask(
    scores: np.ndarray, labels: np.ndarray, background: int | None, params: DHRParams, crf: ImageCRF
) -> np.ndarray:
    """Step 1.3-1.4: M_seed, the DenseCRF's argmax over :func:`seed_probs` as class ids.

    With the CRF switched off (Table 6 row 2) the argmax of the upsampled channels is taken.
    """
    probs, ids = seed_probs(scores, labels, background, (crf.height, crf.width), params.gamma)
    winner = crf.labels(probs) if params.steps.crf else np.argmax(probs, axis=0)
    return ids[winner].astype(np.uint8)


def integrate(seed: np.ndarray, base: np.ndarray | None, labels: np.ndarray, rho: float) -> tuple[np.ndarray, list[int]]:
    """Step 1.5: restore into ``base`` the tags whose seed region the base mask has lost.

    A tag k is lost when ``|{base = k} & {seed = k}| < rho * |{seed = k}|``; its seed region is
    then written into the base mask. Tags the base mask kept, and the background, are left
    untouched. Without a base mask the seed is the result.

    Returns
    -------
    init : ndarray, H x W uint8
    restored : list of int
        The tags restored.
    """
    if base is None:
        return seed.copy(), []
    init = base.copy()
    restored = []
    for tag in labels.tolist():
        in_seed = seed == tag
        size = int(in_seed.sum())
        if size and int((in_seed & (base == tag)).sum()) < rho * size:
            init[in_seed] = tag
            restored.append(tag)
    return init, restored


# --------------------------------------------------------------------------------------------
# Steps 2 and 3: USS and WSS rebalancing (Eqs. 3 and 4)
# --------------------------------------------------------------------------------------------
def wss_heat_maps(
    layers: list[np.ndarray], grid: tuple[int, int], weights: np.ndarray, clip: float,
    prototypes: list[np.ndarray] | None = None, weight: float = 0.0,
) -> np.ndarray:
    """Step 3.2: per layer, resize to the grid, CAP, cosine, min-max; average; min-max.

    ``prototypes``: one G x D_l array per layer, blended into the layer's centroids with ``weight``.
    """
    if prototypes is not None and len(prototypes) != len(layers):
        raise ValueError(f"{len(layers)} WSS layers but prototypes for {len(prototypes)}")
    total = np.zeros(weights.shape, dtype=np.float32)
    for index, layer in enumerate(layers):
        resized = resize_bilinear(layer, grid)
        proto = None if prototypes is None else prototypes[index]
        maps, _ = heat_maps(resized.reshape(layer.shape[0], -1), weights, clip=clip, prototypes=proto, weight=weight)
        total += maps
    return minmax_rows(total / len(layers), clip)


def rebalance_heat(state: ImageState, params: DHRParams) -> tuple[np.ndarray, list[list[int]]]:
    """Steps 2-3.4: the heat maps H over ``state.classes`` on the feature grid, and the groups.

    Returns H (G x h x w float32 in [0, 1]) and the WSS groups used (lists of class ids).
    """
    steps, clip = params.steps, params.ot.minmax_clip
    grid = feature_grid(state, params)
    weights = class_cell_fractions(state.init, state.classes, grid, mode=params.cap.value)
    uss_protos, wss_protos = prototype_rows(state, params)  # ours: blended into the centroids
    blend = params.prototype_weight
    heat = centroids = None
    if steps.uss:  # Step 2: CAP of the USS features, cosine heat maps
        heat, centroids = heat_maps(state.uss.reshape(state.uss.shape[0], -1), weights, clip=clip, prototypes=uss_protos, weight=blend)
    groups = wss_groups(state, centroids, params)  # Step 3.1
    s_ws = wss_heat_maps(state.wss, grid, weights, clip, wss_protos, blend) if needs_wss_maps(groups, params) else None
    if heat is None:  # Table 6 row 6: WSS alone
        heat = s_ws
    elif mixes_wss(params):  # ours: the WSS maps mixed into Step 2's
        heat = minmax_rows((1.0 - params.wss_heat_weight) * heat + params.wss_heat_weight * s_ws, clip)
    calls, final = rebalance_transports(state, groups, params)
    for call in calls:  # Step 3.3
        heat[call.slots] = heat[call.slots] * transport(s_ws[call.slots], call, params)
    heat = minmax_rows(heat * transport(heat, final, params), clip)  # Step 3.4
    return heat.reshape(len(state.classes), *grid), [state.classes[g].tolist() for g in groups]


def final_mask(
    heat: np.ndarray, classes: np.ndarray, init: np.ndarray, params: DHRParams, crf: ImageCRF | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Step 3.5: H upsampled to the image, DenseCRF (argmax without one), class ids.

    Then two additions of ours: the vanished-class guard (``params.guard``, 0.5 by default,
    restoring where the class's upsampled heat map reaches ``params.guard_support``) and
    ``ignore_below`` (255 where the CRF's maximum marginal is below it). Returns the mask and
    that maximum marginal (None without a CRF).
    """
    up = resize_bilinear(heat, init.shape)
    if crf is None:
        winner, confidence = np.argmax(up, axis=0), None
    else:
        q = crf.marginals(up)
        winner, confidence = np.argmax(q, axis=0), q.max(axis=0)
    mask = classes[winner].astype(np.uint8)
    if params.guard > 0:
        mask = guard_vanished(mask, init, classes, params.guard, params.guard_max_share, up.__getitem__, params.guard_support)
    if params.ignore_below > 0 and confidence is not None:
        mask[confidence < params.ignore_below] = IGNORE
    return mask, confidence


# --------------------------------------------------------------------------------------------
# The executor
# --------------------------------------------------------------------------------------------
def _seed_scores(state: ImageState, params: DHRParams, crf: ImageCRF | None) -> None:
    state.scores = seed_scores(state.cam, seed_transport(state, params), params)


def _seed_mask(state: ImageState, params: DHRParams, crf: ImageCRF | None) -> None:
    state.seed = seed_mask(state.scores, state.labels, state.background, params, crf)
    state.init, state.restored = integrate(state.seed, state.base, state.labels, params.rho)


def _heat_maps(state: ImageState, params: DHRParams, crf: ImageCRF | None) -> None:
    state.heat, state.groups = rebalance_heat(state, params)


def _final_mask(state: ImageState, params: DHRParams, crf: ImageCRF | None) -> None:
    state.mask, state.confidence = final_mask(state.heat, state.classes, state.init, params, crf)


STAGES = {
    Stage.SEED_SCORES: _seed_scores,
    Stage.SEED_MASK: _seed_mask,
    Stage.HEAT_MAPS: _heat_maps,
    Stage.FINAL_MASK: _final_mask,
}


def run_stages(state: ImageState, params: DHRParams, crf: ImageCRF | None) -> ImageState:
    """Run ``state``'s remaining stages; seconds per stage into ``state.timings``."""
    while state.next is not None:
        stage, t = state.next, time.perf_counter()
        STAGES[stage](state, params, crf)
        state.timings[stage.value] = time.perf_counter() - t
        advance(state, params)
    return state


def refine(
    cam: np.ndarray,
    labels: np.ndarray,
    *,
    image: np.ndarray,
    base: np.ndarray | None,
    uss: np.ndarray | None,
    wss: list[np.ndarray] | None,
    background: int | None,
    params: DHRParams,
    crf: ImageCRF | None = None,
    prototypes: Prototypes | None = None,
) -> ImageState:
    """DHR for one image: Step 1 (seed, integration), Steps 2-3 (rebalancing), as ``params.steps``.

    Parameters
    ----------
    cam : ndarray, shape (K, h, w)
        Raw CAMs, channel k for ``labels[k]``.
    labels : ndarray, shape (K,)
        Foreground tags, ascending.
    image : ndarray, shape (H, W, 3), uint8
    base : ndarray, shape (H, W), uint8, optional
        M_base; 255 = ignore. Required for Table 6 row 1.
    uss : ndarray, shape (D, h_u, w_u), optional
        Needed when ``params.steps.uss``.
    wss : list of ndarray, each (D_l, h_l, w_l), optional
        Needed when ``params.steps.wss``.
    background : int or None
        Background class id of the dataset.
    params : DHRParams
    crf : ImageCRF, optional
        The image's CRF, to reuse its lattice across calls (``dhr-label tune``); built here
        when omitted.
    prototypes : Prototypes, optional
        Dataset-level class prototypes (:mod:`~.prototypes`), blended into the Step 2/3
        centroids with ``params.prototype_weight``; without them the centroids are the
        image's own (the paper).

    Returns
    -------
    ImageState
        ``mask`` (H x W uint8), and on the way ``init`` (M_init), ``seed``, ``restored``,
        ``groups``, ``confidence``, ``timings``.

    Raises
    ------
    ValueError
        For inputs the command line would refuse (:func:`~.checks.check_image_inputs`), naming
        the argument, expected vs found.
    """
    check_image_inputs(cam, labels, image=image, base=base, uss=uss, wss=wss, background=background, params=params,
                       prototypes=prototypes)
    state = start(ImageState(cam, np.asarray(labels), image, base, uss, wss, background, prototypes), params)
    if state.next is not None and crf is None:
        crf = image_crf(image, params.crf)
    return run_stages(state, params, crf)


def rebalance(
    init: np.ndarray,
    *,
    uss: np.ndarray | None,
    wss: list[np.ndarray] | None,
    params: DHRParams,
    crf: ImageCRF | None,
    prototypes: Prototypes | None = None,
) -> ImageState:
    """Steps 2-3 alone, from a given M_init (rows 5-7; argmax instead of the CRF without ``crf``).

    The same decisions as :func:`refine` after Step 1: one class or one feature cell keeps
    M_init.
    """
    state = ImageState(None, np.zeros(0, np.int64), None, None, uss, wss, prototypes=prototypes, init=init, next=Stage.SEED_MASK)
    if params.steps.needs_uss and uss is None or params.steps.needs_wss and not wss:
        raise ValueError("Steps 2/3 need USS features (rows 5 and 7) or WSS features (row 6)")
    advance(state, params)
    return run_stages(state, params, crf)
