"""The three steps of DHR for one image (Sec. 3.2, Eqs. 2-4), as pure array functions.

``refine`` reads like the paper's pipeline; each step is its own function so that the ablation
rows of Table 6 and the tests can call them one by one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..params import CapMode, DHRParams, Marginal
from .cap import class_cell_fractions, heat_maps, l2_normalise, minmax_rows
from .crf import ImageCRF
from .ot import f_ot
from .resize import resize_bilinear

IGNORE = 255


@dataclass
class Refinement:
    """The result of :func:`refine` for one image."""

    mask: np.ndarray  # H x W uint8, the output (M_base, M_init or M_dh by ablation row)
    init: np.ndarray | None = None  # M_init
    seed: np.ndarray | None = None  # M_seed
    restored: list[int] = field(default_factory=list)  # tags restored from the seed (Step 1.5)
    groups: list[list[int]] = field(default_factory=list)  # WSS groups with 2+ members (Step 3.1)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step, for profiling


def _ot(scores: np.ndarray, params: DHRParams, marginal: np.ndarray | None, kl: bool) -> np.ndarray:
    """``f_OT`` over N x K scores with the parameters of ``params.ot``."""
    p = params.ot
    return f_ot(
        scores,
        eps=p.eps,
        col_marginal=marginal,
        kl_weight=params.marginal_kl if kl else None,
        tol=p.tol,
        max_iter=p.max_iter,
        check_every=p.check_every,
        minmax_clip=p.minmax_clip,
    )


def class_marginal(
    kind: Marginal, classes: np.ndarray, mask: np.ndarray | None, floor: float
) -> tuple[np.ndarray | None, bool]:
    """The class marginal ``v`` of an OT call over ``classes`` and whether it is KL-relaxed.

    ``area``: each class's share of ``mask``'s labelled pixels among ``classes``, floored at
    ``floor`` and renormalised (uniform when no pixel of ``mask`` holds any of them).
    """
    if kind is Marginal.uniform or (kind is Marginal.area and mask is None):
        return None, False
    if kind is Marginal.unbalanced:
        return None, True
    counts = np.bincount(mask.ravel(), minlength=256)[np.asarray(classes)].astype(np.float64)
    if counts.sum() == 0:
        return None, False
    shares = np.maximum(counts / counts.sum(), floor)
    return shares / shares.sum(), False


# --------------------------------------------------------------------------------------------
# Step 1: OT-based seed initialisation and recovery of vanished classes (Eq. 2)
# --------------------------------------------------------------------------------------------
def seed_scores(cam: np.ndarray, params: DHRParams, base: np.ndarray | None, labels: np.ndarray) -> np.ndarray:
    """Step 1.1-1.2: ReLU, per-channel max normalisation, then ``A * f_OT(A)`` if K > 1.

    Returns K x h x w float32 in [0, 1].
    """
    k, h, w = cam.shape
    a = np.maximum(cam.astype(np.float32), 0.0)
    a /= np.maximum(a.reshape(k, -1).max(axis=1), 1e-5)[:, None, None]
    if params.steps.ot and k > 1:
        cells = a.reshape(k, -1).T
        marginal, kl = class_marginal(params.marginal_init, labels, base, params.marginal_floor)
        a = (cells * _ot(cells, params, marginal, kl)).T.reshape(k, h, w)
    return a


def seed_mask(
    scores: np.ndarray, labels: np.ndarray, background: int | None, params: DHRParams, crf: ImageCRF
) -> np.ndarray:
    """Step 1.3-1.4: upsample, prepend the background score, DenseCRF, map to class ids.

    ``bg_score = (1 - max_k A_k) ** gamma`` (CLIP-ES) when the dataset has a background. With
    the CRF switched off (Table 6 row 2) the argmax of the upsampled channels is taken.
    """
    up = resize_bilinear(scores, (crf.height, crf.width))
    if background is not None:
        bg = np.power(np.clip(1.0 - up.max(axis=0, keepdims=True), 0.0, 1.0), params.gamma)
        up = np.concatenate([bg, up], axis=0)
        ids = np.concatenate([[background], labels])
    else:
        ids = np.asarray(labels)
    winner = crf.labels(up) if params.steps.crf else np.argmax(up, axis=0)
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
def uss_heat_maps(
    uss: np.ndarray, init: np.ndarray, classes: np.ndarray, cap: CapMode, clip: float
) -> tuple[np.ndarray, np.ndarray]:
    """Step 2: CAP centroids of the USS features and their cosine maps, G x N in [0, 1]."""
    d, h, w = uss.shape
    weights = class_cell_fractions(init, classes, (h, w), mode=cap.value)
    return heat_maps(uss.reshape(d, -1), weights, clip=clip)


def wss_heat_maps(
    layers: list[np.ndarray], grid: tuple[int, int], init: np.ndarray, classes: np.ndarray, cap: CapMode, clip: float
) -> np.ndarray:
    """Step 3.2: per layer, resize to the USS grid, CAP, cosine, min-max; average; min-max."""
    weights = class_cell_fractions(init, classes, grid, mode=cap.value)
    total = np.zeros((len(classes), grid[0] * grid[1]), dtype=np.float32)
    for layer in layers:
        resized = resize_bilinear(layer, grid)
        maps, _ = heat_maps(resized.reshape(layer.shape[0], -1), weights, clip=clip)
        total += maps
    return minmax_rows(total / len(layers), clip)


def correlated_groups(centroids: np.ndarray, tau: float) -> list[list[int]]:
    """Step 3.1: groups ``{i} + {j > i : ReLU(cos(V_i, V_j)) > tau}`` with 2+ members.

    Indices refer to rows of ``centroids``; tau = 1 gives no group (WSS balancing off).
    """
    unit = l2_normalise(centroids, 1)
    # Clipped at 1: float32 rounding puts the cosine of parallel centroids just above 1,
    # which would make tau = 1 group them instead of switching WSS balancing off.
    corr = np.clip(unit @ unit.T, 0.0, 1.0)
    groups = []
    for i in range(len(centroids)):
        members = [i] + [j for j in range(i + 1, len(centroids)) if corr[i, j] > tau]
        if len(members) > 1:
            groups.append(members)
    return groups


def init_classes(init: np.ndarray) -> np.ndarray:
    """Gamma of Step 2.1: the class ids present in M_init, ascending, int64 (ignore excluded)."""
    counts = np.bincount(init.ravel(), minlength=256)
    counts[IGNORE] = 0
    return np.flatnonzero(counts).astype(np.int64)


def rebalance_heat(
    init: np.ndarray,
    classes: np.ndarray,
    uss: np.ndarray | None,
    wss: list[np.ndarray] | None,
    params: DHRParams,
) -> tuple[np.ndarray, list[list[int]], dict[str, float]]:
    """Steps 2-3 up to the heat maps H over ``classes`` (2 or more, from :func:`init_classes`).

    Returns H (G x h x w float32 in [0, 1], on the USS grid, or the first WSS layer's when
    USS is off), the WSS groups used (lists of class ids) and the seconds spent on heat maps
    and OT.
    """
    t0 = time.perf_counter()
    clip = params.ot.minmax_clip
    steps = params.steps
    floor = params.marginal_floor

    def ot_over(scores: np.ndarray, members: np.ndarray) -> np.ndarray:
        marginal, kl = class_marginal(params.marginal_rebalance, members, init, floor)
        return _ot(scores.T, params, marginal, kl).T

    groups: list[list[int]] = []
    found: list[list[int]] = []
    if steps.uss:
        heat, centroids = uss_heat_maps(uss, init, classes, params.cap, clip)
        grid = uss.shape[1:]
        if steps.wss:
            found = correlated_groups(centroids, params.tau)
    else:
        grid = wss[0].shape[1:]
    # Step 3.2 only where it is used: a group with 2+ members, or WSS alone (row 6). Most
    # images have no group, and the WSS maps are the costliest non-CRF work.
    if steps.wss and (found or not steps.uss):
        s_ws = wss_heat_maps(wss, grid, init, classes, params.cap, clip)
    t1 = time.perf_counter()
    if steps.uss and steps.wss:
        for members in found:
            index = np.asarray(members)
            heat[index] = heat[index] * ot_over(s_ws[index], classes[index])
            groups.append(classes[index].tolist())
    elif steps.wss:  # Table 6 row 6: WSS alone
        heat = s_ws
    heat = minmax_rows(heat * ot_over(heat, classes), clip)
    timings = {"heat_maps": t1 - t0, "ot": time.perf_counter() - t1}
    return heat.reshape(len(classes), *grid), groups, timings


def heat_mask(
    heat: np.ndarray, classes: np.ndarray, init: np.ndarray, params: DHRParams, crf: ImageCRF | None
) -> np.ndarray:
    """Step 3.5: H (G x h x w) upsampled to the image, DenseCRF (argmax without), class ids."""
    up = resize_bilinear(heat, init.shape)
    winner = crf.labels(up) if crf is not None else np.argmax(up, axis=0)
    mask = classes[winner].astype(np.uint8)
    if params.guard > 0:
        mask = guard_vanished(mask, init, classes, params.guard, params.guard_max_share)
    return mask


def rebalance(
    init: np.ndarray,
    uss: np.ndarray | None,
    wss: list[np.ndarray] | None,
    params: DHRParams,
    crf: ImageCRF | None,
) -> tuple[np.ndarray, list[list[int]], dict[str, float]]:
    """Steps 2-3: the rebalanced mask M_dh (or the row 5 / row 6 ablations).

    Returns the mask (H x W uint8), the WSS groups used (lists of class ids) and the seconds
    spent on heat maps, OT and the final CRF.
    """
    classes = init_classes(init)
    source = uss if params.steps.uss else (wss[0] if wss else None)
    if source is None:
        raise ValueError("Steps 2/3 need USS features (rows 5 and 7) or WSS features (row 6)")
    if len(classes) <= 1 or source.shape[1] * source.shape[2] < 2:
        # One class: nothing to rebalance. One feature cell: min-max over it leaves every
        # heat map at 0, and the argmax would hand the image to the first class.
        return init.copy(), [], {}
    heat, groups, timings = rebalance_heat(init, classes, uss, wss, params)
    t2 = time.perf_counter()
    mask = heat_mask(heat, classes, init, params, crf)
    timings["crf2"] = time.perf_counter() - t2
    return mask, groups, timings


def guard_vanished(
    mask: np.ndarray, init: np.ndarray, classes: np.ndarray, ratio: float, max_share: float = 1.0
) -> np.ndarray:
    """Restore M_init's region of a minor class that rebalancing made vanish (our addition).

    A class k of M_init covering less than ``max_share`` of M_init's labelled pixels vanished
    when ``|{mask = k} & {init = k}| < ratio * |{init = k}|``; its M_init region is then
    written back, as Step 1 restores lost tags into the base mask. The M_init regions are
    disjoint, so the order of classes does not matter.
    """
    out = mask.copy()
    labelled = int((init != IGNORE).sum())
    for k in classes.tolist():
        region = init == k
        size = int(region.sum())
        if size and size < max_share * labelled and int((mask[region] == k).sum()) < ratio * size:
            out[region] = k
    return out


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
) -> Refinement:
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
    """
    steps = params.steps
    if not steps.init:
        if base is None:
            raise ValueError("Table 6 row 1 outputs the base mask, and this image has none")
        return Refinement(mask=base.copy())
    if steps.uss and uss is None:
        raise ValueError("Step 2 (USS rebalancing) is switched on and no USS features were given")
    if steps.wss and not wss:
        raise ValueError("Step 3 (WSS rebalancing) is switched on and no WSS layers were given")
    t0 = time.perf_counter()
    crf = ImageCRF(image, params.crf)
    scores = seed_scores(cam, params, base, labels)  # Step 1.1-1.2
    t1 = time.perf_counter()
    seed = seed_mask(scores, labels, background, params, crf)  # Step 1.3-1.4
    t2 = time.perf_counter()
    init, restored = integrate(seed, base, labels, params.rho)  # Step 1.5
    timings = {"step1_ot": t1 - t0, "crf1": t2 - t1, "integrate": time.perf_counter() - t2}
    if not steps.rebalance:
        return Refinement(mask=init, init=init, seed=seed, restored=restored, timings=timings)
    mask, groups, more = rebalance(init, uss, wss, params, crf)  # Steps 2-3
    timings.update(more)
    return Refinement(mask=mask, init=init, seed=seed, restored=restored, groups=groups, timings=timings)
