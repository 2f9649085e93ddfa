"""DHR for one image as a sequence of stages over one typed state (paper Sec. 3.2).

::

    inputs ─► SEED_SCORES ─► SEED_MASK ─► HEAT_MAPS ─► FINAL_MASK ─► mask
              A * f_OT(A)    CRF 1,        CAP, cosine,  upsample,
              (Step 1.1-2)   integration   WSS groups,   CRF 2, argmax
                             (Step 1.3-5)  OT (Steps 2-3) (Step 3.5)

This module is the description: the stages, the state they fill in, and every decision of the
control flow (which stage comes next, when M_init is the answer, which class subsets get an OT
call and with which class marginal). It holds no array maths: the stages are
:mod:`.seed` (Step 1) and :mod:`.rebalance` (Steps 2-3), and :mod:`.stages` runs them for a
batch of states (one state in a CPU worker, many on a device).
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field

import numpy as np
import torch

from ..params import DHRParams, Marginal
from .checks import prototypes_problem
from .ot import Transport
from .prototypes import Prototypes
from .tensors import to_device, to_host

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

    Arrays are tensors on the device the image is refined on; what the decisions read (tags,
    class ids, pixel counts) is on the host.
    """

    cam: torch.Tensor | None  # K x h x w raw CAMs, channel k for labels[k]
    labels: np.ndarray  # K foreground tags, ascending, int64
    image: torch.Tensor | None  # H x W x 3 uint8 (None: Steps 2-3 alone, without a CRF)
    base: torch.Tensor | None  # H x W uint8 M_base (255 = ignore), or None
    uss: torch.Tensor | None = None  # D x h_u x w_u
    wss: list[torch.Tensor] | None = None  # WSS layers, each D_l x h_l x w_l
    background: int | None = None
    prototypes: Prototypes | None = None  # dataset-level class prototypes, or None
    next: Stage | None = None  # the stage to run; None when ``mask`` is final
    scores: torch.Tensor | None = None  # SEED_SCORES: K x h x w in [0, 1]
    seed: torch.Tensor | None = None  # SEED_MASK: M_seed, H x W uint8
    init: torch.Tensor | None = None  # SEED_MASK: M_init, H x W uint8
    init_counts: np.ndarray | None = None  # SEED_MASK: pixels of each class id 0..255 in M_init
    restored: list[int] = field(default_factory=list)  # SEED_MASK: tags restored from the seed
    classes: np.ndarray | None = None  # Gamma of Step 2.1, set when Steps 2-3 run
    heat: torch.Tensor | None = None  # HEAT_MAPS: G x h x w in [0, 1] on the feature grid
    groups: list[list[int]] = field(default_factory=list)  # HEAT_MAPS: WSS groups (class ids)
    mask: torch.Tensor | None = None  # the output: M_base, M_init or M_dh by ablation row
    confidence: torch.Tensor | None = None  # FINAL_MASK: max marginal of the last CRF, H x W
    warnings: list[str] = field(default_factory=list)  # e.g. an OT that did not converge
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage

    @property
    def size(self) -> tuple[int, int]:
        source = self.image if self.image is not None else self.init
        return tuple(source.shape[:2])

    @property
    def device(self) -> torch.device:
        return next(t for t in (self.cam, self.init, self.image) if t is not None).device


def new_state(
    cam, labels, image, base, uss=None, wss=None, background: int | None = None, prototypes: Prototypes | None = None,
    *, device="cpu",
) -> ImageState:
    """An :class:`ImageState` of one image's inputs (numpy arrays or tensors), uploaded to
    ``device`` (a tensor already there is not copied)."""
    def up(array):
        return None if array is None else to_device(array, device)

    tags = np.asarray(to_host(labels) if isinstance(labels, torch.Tensor) else labels, dtype=np.int64).reshape(-1)
    return ImageState(up(cam), tags, up(image), up(base), up(uss), None if wss is None else [up(layer) for layer in wss],
                      background, prototypes)


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
        state.mask, state.next = state.base.clone(), None
    else:
        state.next = Stage.SEED_SCORES
    return state


def advance(state: ImageState, params: DHRParams) -> None:
    """Set ``state.next`` after the stage just run: the only branching of the pipeline."""
    done = state.next
    if done is Stage.SEED_SCORES:
        state.next = Stage.SEED_MASK
    elif done is Stage.SEED_MASK:
        _after_seed(state, params)
    elif done is Stage.HEAT_MAPS:
        state.next = Stage.FINAL_MASK
    else:
        state.next = None


def _after_seed(state: ImageState, params: DHRParams) -> None:
    """M_init is the answer when Steps 2-3 are off (rows 2-4), when M_init has a single class
    (nothing to rebalance), or when the feature grid has one cell (min-max over one cell leaves
    every heat map at 0 and the argmax would hand the image to one class)."""
    classes = present_classes(state.init_counts)
    if not params.steps.rebalance or len(classes) <= 1 or feature_cells(state, params) < 2:
        state.mask, state.classes, state.next = state.init.clone(), None, None
    else:
        state.classes, state.next = classes, Stage.HEAT_MAPS


def resume(seeded: ImageState, params: DHRParams) -> ImageState:
    """A copy of a state that has run Step 1 (its SEED_MASK), set to go on under ``params``.

    ``dhr-label tune`` computes Step 1 once per Step-1 setting (:func:`step1_settings`) and
    resumes every Steps 2-3 variant from it. The copy shares the Step-1 tensors (no stage
    writes into a tensor it did not make) and starts with no warnings or timings of its own.
    """
    if seeded.init is None:
        raise ValueError("resume() takes a state that has run Step 1 (SEED_MASK)")
    state = dataclasses.replace(seeded, warnings=[], timings={}, heat=None, groups=[], mask=None, confidence=None)
    _after_seed(state, params)
    return state


def step1_settings(params: DHRParams) -> tuple:
    """What decides Step 1 (its CRF included): settings that agree here share one Step 1."""
    return (
        params.ot, params.crf, params.steps.init, params.steps.ot, params.steps.crf, params.gamma, params.rho,
        params.marginal_init,
        params.marginal_floor if params.marginal_init is Marginal.area else None,
        params.marginal_kl if params.marginal_init is Marginal.unbalanced else None,
    )


def class_counts(mask: torch.Tensor) -> np.ndarray:
    """Pixels of each class id 0..255 in ``mask`` (host int64; one transfer)."""
    return to_host(torch.bincount(mask.reshape(-1).long(), minlength=256))


def present_classes(counts: np.ndarray) -> np.ndarray:
    """Gamma of Step 2.1: the class ids with pixels in ``counts``, ascending (ignore excluded)."""
    present = np.flatnonzero(counts).astype(np.int64)
    return present[present != IGNORE]


def feature_grid(state: ImageState, params: DHRParams) -> tuple[int, int]:
    """The grid Steps 2-3 work on: the USS map's, or the first WSS layer's when USS is off."""
    source = state.uss if params.steps.uss else state.wss[0]
    return tuple(source.shape[1:])


def feature_cells(state: ImageState, params: DHRParams) -> int:
    grid = feature_grid(state, params)
    return grid[0] * grid[1]


# --------------------------------------------------------------------------------------------
# The OT calls: which class subsets, with which class marginal
# --------------------------------------------------------------------------------------------
def class_marginal(kind: Marginal, classes: np.ndarray, counts: np.ndarray | None, floor: float) -> tuple[np.ndarray | None, bool]:
    """The class marginal ``v`` of an OT call over ``classes`` and whether it is KL-relaxed.

    ``area``: each class's share of the labelled pixels among ``classes`` (``counts``: pixels
    per class id of the mask the shares come from), floored at ``floor`` and renormalised
    (uniform when no pixel holds any of them, or when there is no mask).
    """
    if kind is Marginal.uniform or (kind is Marginal.area and counts is None):
        return None, False
    if kind is Marginal.unbalanced:
        return None, True
    mine = np.asarray(counts)[np.asarray(classes)].astype(np.float64)
    if mine.sum() == 0:
        return None, False
    shares = np.maximum(mine / mine.sum(), floor)
    return shares / shares.sum(), False


def seed_transport(state: ImageState, params: DHRParams) -> Transport | None:
    """The Step-1 OT call over the K tags (None when OT is off or K = 1)."""
    if not params.steps.ot or len(state.labels) < 2:
        return None
    counts = class_counts(state.base) if params.marginal_init is Marginal.area and state.base is not None else None
    marginal, kl = class_marginal(params.marginal_init, state.labels, counts, params.marginal_floor)
    return Transport(np.arange(len(state.labels)), marginal, kl)


def rebalance_transports(
    state: ImageState, groups: list[list[int]], params: DHRParams, sizes: np.ndarray | None = None
) -> tuple[list[Transport], Transport]:
    """The OT calls of Steps 2-3: one per WSS group (Step 3.3), then the final one over all of
    Gamma (Step 3.4); class marginals (``params.marginal_rebalance``) over ``sizes``, pixels per
    class id: M_init's by default, a previous answer's in the size passes (ours)."""
    sizes = state.init_counts if sizes is None else sizes

    def over(slots: np.ndarray) -> Transport:
        marginal, kl = class_marginal(params.marginal_rebalance, state.classes[slots], sizes, params.marginal_floor)
        return Transport(slots, marginal, kl)

    return [over(np.asarray(g)) for g in groups], over(np.arange(len(state.classes)))


def uses_groups(params: DHRParams) -> bool:
    """Step 3.1's WSS groups exist only with both feature sources on (full DHR)."""
    return params.steps.uss and params.steps.wss


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
