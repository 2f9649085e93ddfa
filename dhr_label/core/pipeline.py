"""DHR for one image as a sequence of stages over one typed state (paper Sec. 3.2).

::

    inputs ─► SEED_SCORES ─► SEED_MASK ─► HEAT_MAPS ─► FINAL_MASK ─► mask
              A * f_OT(A)    CRF 1,        CAP, cosine,  upsample,
              (Step 1.1-2)   integration   WSS groups,   CRF 2, argmax
                             (Step 1.3-5)  OT (Steps 2-3) (Step 3.5)

This module is the description: the stages, the state they fill in, and every decision of
the control flow (which stage comes next, when M_init is the answer, which class subsets get
an OT call and with which class marginal). It computes nothing heavy. Two executors run it:
:func:`dhr_label.core.dhr.refine` (one image, numpy and pydensecrf) and
:func:`dhr_label.core.batched.refine_batch` (many images, torch, any device).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from ..params import DHRParams, Marginal
from .arrays import is_tensor
from .cap import l2_normalise
from .checks import prototypes_problem

IGNORE = 255


class Stage(str, enum.Enum):
    """The stages of DHR, in order."""

    SEED_SCORES = "seed_scores"  # Step 1.1-1.2: ReLU, max-normalise, A * f_OT(A)
    SEED_MASK = "seed_mask"  # Step 1.3-1.5: upsample, CRF 1, M_seed, integration into M_init
    HEAT_MAPS = "heat_maps"  # Steps 2-3.4: USS/WSS heat maps, groups, OT: H on the feature grid
    FINAL_MASK = "final_mask"  # Step 3.5: upsample H, CRF 2, M_dh (guard, ignore-below)


@dataclass
class ImageState:
    """One image on its way through the stages: its inputs, then what each stage adds.

    Arrays are numpy (one-image executor) or torch tensors (batched executor); the fields
    mean the same in both.
    """

    cam: object  # K x h x w raw CAMs, channel k for labels[k]
    labels: np.ndarray  # K foreground tags, ascending (host)
    image: object  # H x W x 3 uint8
    base: object | None  # H x W uint8 M_base (255 = ignore), or None
    uss: object | None = None  # D x h_u x w_u
    wss: list | None = None  # WSS layers, each D_l x h_l x w_l
    background: int | None = None
    prototypes: object | None = None  # dataset-level class prototypes (core.prototypes), or None
    next: Stage | None = None  # the stage to run; None when ``mask`` is final
    scores: object | None = None  # SEED_SCORES: K x h x w in [0, 1]
    seed: object | None = None  # SEED_MASK: M_seed
    init: object | None = None  # SEED_MASK: M_init
    restored: list[int] = field(default_factory=list)  # SEED_MASK: tags restored from the seed
    classes: np.ndarray | None = None  # Gamma of Step 2.1, set when Steps 2-3 run (host)
    heat: object | None = None  # HEAT_MAPS: G x h x w in [0, 1] on the feature grid
    groups: list[list[int]] = field(default_factory=list)  # HEAT_MAPS: WSS groups (class ids)
    mask: object | None = None  # the output: M_base, M_init or M_dh by ablation row
    confidence: object | None = None  # FINAL_MASK: max marginal of the last CRF, H x W
    warnings: list[str] = field(default_factory=list)  # e.g. an OT that did not converge
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.image.shape[:2])


def start(state: ImageState, params: DHRParams) -> ImageState:
    """Check that ``state`` holds what the switched-on steps read and set its first stage.

    Raises ValueError (a programming error of the caller: the I/O layer reads exactly what
    :class:`~dhr_label.params.Steps` says is needed).
    """
    steps = params.steps
    if steps.needs_base and state.base is None:
        raise ValueError("Table 6 row 1 outputs the base mask, and this image has none")
    if steps.needs_uss and state.uss is None:
        raise ValueError("Step 2 (USS rebalancing) is switched on and no USS features were given")
    if steps.needs_wss and not state.wss:
        raise ValueError("Step 3 (WSS rebalancing) is switched on and no WSS layers were given")
    if not steps.init:  # row 1: the base mask, unchanged (a copy: never the caller's array)
        state.mask, state.next = copy(state.base), None
    else:
        state.next = Stage.SEED_SCORES
    return state


def advance(state: ImageState, params: DHRParams) -> None:
    """Set ``state.next`` after the stage just run: the only branching of the pipeline.

    After SEED_MASK, M_init is the answer when Steps 2-3 are off (rows 2-4), when M_init has
    a single class (nothing to rebalance), or when the feature grid has one cell (min-max over
    one cell leaves every heat map at 0 and the argmax would hand the image to one class).
    """
    done = state.next
    if done is Stage.SEED_SCORES:
        state.next = Stage.SEED_MASK
    elif done is Stage.SEED_MASK:
        classes = init_classes(state.init)
        if not params.steps.rebalance or len(classes) <= 1 or feature_cells(state, params) < 2:
            state.mask, state.next = copy(state.init), None
        else:
            state.classes, state.next = classes, Stage.HEAT_MAPS
    elif done is Stage.HEAT_MAPS:
        state.next = Stage.FINAL_MASK
    else:
        state.next = None


def copy(array):
    """A copy of a numpy array or a torch tensor."""
    return array.clone() if is_tensor(array) else array.copy()


def init_classes(init) -> np.ndarray:
    """Gamma of Step 2.1: the class ids present in M_init, ascending, int64 (ignore excluded)."""
    if not isinstance(init, np.ndarray):  # a tensor: count on its device, return to the host
        counts = init.reshape(-1).long().bincount(minlength=256).cpu().numpy()
    else:
        counts = np.bincount(init.ravel(), minlength=256)
    counts[IGNORE] = 0
    return np.flatnonzero(counts).astype(np.int64)


def feature_grid(state: ImageState, params: DHRParams) -> tuple[int, int]:
    """The grid Steps 2-3 work on: the USS map's, or the first WSS layer's when USS is off."""
    source = state.uss if params.steps.uss else state.wss[0]
    return tuple(source.shape[1:])


def feature_cells(state: ImageState, params: DHRParams) -> int:
    grid = feature_grid(state, params)
    return grid[0] * grid[1]


# --------------------------------------------------------------------------------------------
# Steps 2-3: which class subsets get an OT call, with which class marginal
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Transport:
    """One f_OT call: over the heat-map rows ``slots`` (indices into ``state.classes``).

    ``marginal``: the class marginal (positive, sums to 1), None for uniform; ``kl``: whether
    it is KL-relaxed (unbalanced OT, weight ``params.marginal_kl``).
    """

    slots: np.ndarray
    marginal: np.ndarray | None
    kl: bool


def class_marginal(kind: Marginal, classes: np.ndarray, mask, floor: float) -> tuple[np.ndarray | None, bool]:
    """The class marginal ``v`` of an OT call over ``classes`` and whether it is KL-relaxed.

    ``area``: each class's share of ``mask``'s labelled pixels among ``classes``, floored at
    ``floor`` and renormalised (uniform when no pixel of ``mask`` holds any of them, or when
    there is no mask).
    """
    if kind is Marginal.uniform or (kind is Marginal.area and mask is None):
        return None, False
    if kind is Marginal.unbalanced:
        return None, True
    if isinstance(mask, np.ndarray):
        counts = np.bincount(mask.ravel(), minlength=256)
    else:
        counts = mask.reshape(-1).long().bincount(minlength=256).cpu().numpy()
    counts = counts[np.asarray(classes)].astype(np.float64)
    if counts.sum() == 0:
        return None, False
    shares = np.maximum(counts / counts.sum(), floor)
    return shares / shares.sum(), False


def seed_transport(state: ImageState, params: DHRParams) -> Transport | None:
    """The Step-1 OT call over the K tags (None when OT is off or K = 1)."""
    if not params.steps.ot or len(state.labels) < 2:
        return None
    marginal, kl = class_marginal(params.marginal_init, state.labels, state.base, params.marginal_floor)
    return Transport(np.arange(len(state.labels)), marginal, kl)


def correlated_groups(centroids: np.ndarray, tau: float) -> list[list[int]]:
    """Step 3.1: groups ``{i} + {j > i : ReLU(cos(V_i, V_j)) > tau}`` with 2+ members.

    Indices refer to rows of ``centroids`` (G x D, host); tau = 1 gives no group.
    """
    unit = l2_normalise(np.asarray(centroids, dtype=np.float32), 1)
    # Clipped at 1: float32 rounding puts the cosine of parallel centroids just above 1,
    # which would make tau = 1 group them instead of switching WSS balancing off.
    corr = np.clip(unit @ unit.T, 0.0, 1.0)
    groups = []
    for i in range(len(centroids)):
        members = [i] + [j for j in range(i + 1, len(centroids)) if corr[i, j] > tau]
        if len(members) > 1:
            groups.append(members)
    return groups


def wss_groups(state: ImageState, centroids, params: DHRParams) -> list[list[int]]:
    """The WSS groups of Step 3.1 (slot indices), from the USS centroids; none without both
    feature sources on."""
    if not (params.steps.uss and params.steps.wss):
        return []
    return correlated_groups(centroids, params.tau)


def needs_wss_maps(groups: list[list[int]], params: DHRParams) -> bool:
    """Step 3.2 runs only where it is used: a group of 2+ classes, WSS alone (row 6), or WSS
    maps mixed into Step 2's (``wss_heat_weight``). Most images have no group, and the WSS maps
    are the costliest non-CRF work."""
    return params.steps.wss and (bool(groups) or not params.steps.uss or mixes_wss(params))


def mixes_wss(params: DHRParams) -> bool:
    """Whether Step 2's heat maps take in the WSS maps (ours: ``wss_heat_weight``, full DHR)."""
    return params.steps.uss and params.steps.wss and params.wss_heat_weight > 0


def prototype_rows(state: ImageState, params: DHRParams) -> tuple[np.ndarray | None, list | None]:
    """The prototypes of ``state.classes``: USS (G x D) and per WSS layer, or None where not
    blended (``params.prototype_weight`` 0, no prototypes, or no USS: they live on its grid)."""
    if not params.uses_prototypes or state.prototypes is None:
        return None, None
    p = state.prototypes
    problem = prototypes_problem(p, [state.uss.shape[0]] + [layer.shape[0] for layer in state.wss or []])
    if problem is not None:
        raise ValueError(problem)
    if p.num_classes <= int(state.classes.max()):
        raise ValueError(f"the prototypes hold {p.num_classes} classes, this image has class {int(state.classes.max())}")
    return p.uss[state.classes], ([layer[state.classes] for layer in p.wss] if p.wss else None)


def rebalance_transports(state: ImageState, groups: list[list[int]], params: DHRParams) -> tuple[list[Transport], Transport]:
    """The OT calls of Steps 2-3: one per WSS group (Step 3.3), then the final one over all of
    Gamma (Step 3.4); class marginals over M_init (``params.marginal_rebalance``)."""

    def over(slots: np.ndarray) -> Transport:
        marginal, kl = class_marginal(params.marginal_rebalance, state.classes[slots], state.init, params.marginal_floor)
        return Transport(slots, marginal, kl)

    return [over(np.asarray(g)) for g in groups], over(np.arange(len(state.classes)))


def guard_vanished(
    mask: np.ndarray, init: np.ndarray, classes: np.ndarray, ratio: float, max_share: float = 1.0,
    support=None, threshold: float = 0.0,
) -> np.ndarray:
    """Restore M_init's region of a minor class that rebalancing made vanish (our addition).

    A class k of M_init covering less than ``max_share`` of M_init's labelled pixels vanished
    when ``|{mask = k} & {init = k}| < ratio * |{init = k}|``; its M_init region is then
    written back, as Step 1 restores lost tags into the base mask. With ``threshold`` > 0
    only the pixels of that region where the class's own heat map reaches ``threshold`` are
    written back: ``support(slot)`` gives the H x W upsampled heat map of ``classes[slot]``
    (a callable, so the batched executor moves a map to the host only for a guarded class).
    M_init's region of a minor class is often a blob two to five times the object; its heat
    map marks the part that looks like the class. The M_init regions are disjoint, so the
    order of classes does not matter.
    """
    out = mask.copy()
    labelled = int((init != IGNORE).sum())
    for slot, k in enumerate(classes.tolist()):
        region = init == k
        size = int(region.sum())
        if size and size < max_share * labelled and int((mask[region] == k).sum()) < ratio * size:
            if threshold > 0 and support is not None:
                region &= np.asarray(support(slot)) >= threshold
            out[region] = k
    return out
