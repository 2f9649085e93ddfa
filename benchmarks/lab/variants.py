"""The Steps 2-3 variants the lab scores: ``NAME[:key=value,...]``.

A variant takes one :class:`~common.Image` (Step 1 done) and gives a :class:`Plan`: the state
resumed for its parameters and the HEAT_MAPS stage to run on it (the package's, or
``heat.rebalance_heat`` with hooks); :func:`mask_of` then runs the package's FINAL_MASK
(upsampling, DenseCRF or argmax, guard). In a spec:

- ``p.FIELD=VALUE`` changes a ``DHRParams`` field (``p.size_passes=0``, ``p.ot.eps=0.05``);
- ``paper`` (no value) first sets the paper's Steps 2-3 (``params.PAPER_STEPS_2_3``);
- ``f.colour=W`` (with ``f.bins``, ``f.src``, ``f.support``, ``f.alpha``) mixes a per-image
  colour model into the CRF's unary (``final.py``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import common
import heat as lab_heat
import numpy as np
import torch
from common import Image
from final import ColourCRFs

from dhr_label.core.cap import cell_fractions
from dhr_label.core.pipeline import ImageState, Stage, advance, resume
from dhr_label.core.prototypes import Prototypes
from dhr_label.core.rebalance import final_mask, rebalance_heat
from dhr_label.core.tensors import to_host
from dhr_label.params import PAPER_STEPS_2_3, DHRParams

REGISTRY: dict[str, tuple[Callable, str]] = {}  # name -> (function, version: bump to drop cached results)


def variant(name: str, version: str = "1"):
    def register(fn):
        REGISTRY[name] = (fn, version)
        return fn
    return register


@dataclass
class Plan:
    """What a variant runs: the resumed state, its HEAT_MAPS stage, the parameters of both stages."""

    state: ImageState
    stage: Callable
    params: DHRParams


@dataclass(frozen=True)
class Spec:
    """A parsed spec: the variant, its options, the ``DHRParams`` and the colour model's options."""

    name: str
    options: dict
    params: DHRParams
    final: dict


def parse(spec: str) -> Spec:
    """``name:k=v,...`` -> :class:`Spec` (exits naming the variant or field when unknown)."""
    name, _, rest = spec.partition(":")
    if name not in REGISTRY:
        raise SystemExit(f"unknown variant {name!r}; known: {', '.join(sorted(REGISTRY))}")
    options, changes, final = {}, {}, {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key == "paper" and not value:
            changes = {**PAPER_STEPS_2_3, **changes}
        elif key.startswith("p."):
            changes[key[2:]] = _value(value)
        elif key.startswith("f."):
            final[key[2:]] = _value(value)
        else:
            options[key] = _value(value)
    try:
        params = DHRParams().with_values(changes) if changes else DHRParams()
    except ValueError as exc:
        raise SystemExit(f"{spec}: {exc}") from None
    return Spec(name, options, params, final)


def _value(text: str):
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def prepare(ds, spec: str):
    """A variant's dataset-level state (``fn.prepare(ds, **options)``), or None."""
    parsed = parse(spec)
    fn = REGISTRY[parsed.name][0]
    return fn.prepare(ds, **parsed.options) if hasattr(fn, "prepare") else None


def mask_of(img: Image, spec: str, crf: bool, model=None) -> np.ndarray:
    """The final mask of ``spec`` for ``img`` (M_init where Steps 2-3 do not run), H x W uint8.

    ``model``: the variant's :func:`prepare` result. ``img`` must hold Step 1 under the spec's
    Step-1 settings (``common.step1_key``).
    """
    parsed = parse(spec)
    fn = REGISTRY[parsed.name][0]
    options = dict(parsed.options, model=model) if hasattr(fn, "prepare") else parsed.options
    plan = fn(img, parsed.params, **options)
    state, params = plan.state, plan.params
    if state.next is Stage.HEAT_MAPS:
        plan.stage([state], params, None)
        advance(state, params)
    if state.next is Stage.FINAL_MASK:
        crfs = img.crf(params) if crf else None
        if parsed.final.get("colour", 0) > 0:
            if params.colour_weight > 0:  # the package's own colour model (0.5) would mix in twice
                raise ValueError(f"{spec}: f.colour on top of the package's colour model; add p.colour_weight=0")
            crfs = ColourCRFs(crfs, [state], **parsed.final)
        final_mask([state], params, crfs)
        advance(state, params)
    return to_host(state.mask)


# --------------------------------------------------------------------------------------------
# The package itself
# --------------------------------------------------------------------------------------------
@variant("main")
def main_variant(img: Image, params: DHRParams) -> Plan:
    """The package's Steps 2-3 (its defaults unless ``p.``/``paper`` change them)."""
    return Plan(resume(img.seeded, params), rebalance_heat, params)


# --------------------------------------------------------------------------------------------
# The oracle ladder: ground-truth centroids for some classes
# --------------------------------------------------------------------------------------------
def oracle_classes(state: ImageState, gt: np.ndarray, which: str, cls: int, large: float) -> np.ndarray:
    """Which slots of Gamma get ground-truth centroids: ``all``, ``large`` (>= ``large`` of
    M_init's labelled pixels), ``small`` (the rest) or ``one`` (class id ``cls``); only
    classes with ground-truth pixels."""
    counts = state.init_counts[state.classes].astype(np.float64)
    share = counts / max(1, int(state.init_counts.sum() - state.init_counts[255]))
    in_gt = np.bincount(gt.ravel(), minlength=256)[state.classes] > 0
    groups = {"all": np.ones(len(share), bool), "large": share >= large, "small": share < large, "one": state.classes == cls}
    if which not in groups:
        raise SystemExit(f"oracle group must be all, large, small or one, got {which!r}")
    return groups[which] & in_gt


@variant("oracle")
def oracle(img: Image, params: DHRParams, group: str = "all", cls: int = -1, large: float = 0.05,
           mode: str = "blend") -> Plan:
    """The chosen classes' centroids pooled over their ground-truth regions (every feature
    source): their CAP weights are the ground truth's cell fractions instead of the package's
    support; ``mode`` blend: blended with the prototypes as the package blends; alone: the
    ground-truth centroid as it is (its prototype rows zero). The other classes keep the
    package's support and blend. A batch of one image (the lab's)."""
    if mode not in ("blend", "alone"):
        raise SystemExit(f"oracle mode must be blend or alone, got {mode!r}")
    state = resume(img.seeded, params)
    if state.next is None:
        return Plan(state, rebalance_heat, params)
    pick = oracle_classes(state, img.gt, group, cls, large)
    slots = torch.as_tensor(np.flatnonzero(pick))

    def support(states, grids, weights):
        truth, _ = cell_fractions([img.gt_tensor()], [state.classes], grids, mode=params.cap.value)
        out = weights.clone()
        out[0, slots] = truth[0, slots]
        return out

    def rows(states, rows):
        uss, wss = rows[0]
        if uss is None:
            return rows
        uss = np.where(pick[:, None], 0.0, uss).astype(uss.dtype)
        wss = None if wss is None else [np.where(pick[:, None], 0.0, layer).astype(layer.dtype) for layer in wss]
        return [(uss, wss)]

    hooks = lab_heat.Hooks(support=support, rows=rows if mode == "alone" else None)
    return Plan(state, partial(lab_heat.rebalance_heat, hooks=hooks), params)


# --------------------------------------------------------------------------------------------
# Beyond the centroids: the dataset-level class model and the class sizes
# --------------------------------------------------------------------------------------------
@variant("proto")
def proto_source(img: Image, params: DHRParams, src: str = "base", gtcls: int = -1, model=None) -> Plan:
    """The package's Steps 2-3 with the prototypes pooled from ``src`` (base: refine's; gt: the
    ground truth, an oracle), or with ``gtcls`` >= 0 refine's with that class's rows from the
    ground truth."""
    return Plan(resume(common.with_prototypes(img.seeded, model), params), rebalance_heat, params)


def proto_prepare(ds, src: str = "base", gtcls: int = -1, **_) -> Prototypes:
    protos = common.prototypes(ds, src)
    if gtcls < 0:
        return protos
    truth = common.prototypes(ds, "gt")
    arrays = [a.copy() for a in (protos.uss, *protos.wss)]
    for a, b in zip(arrays, (truth.uss, *truth.wss)):
        a[gtcls] = b[gtcls]
    return Prototypes(uss=arrays[0], wss=tuple(arrays[1:]))


proto_source.prepare = proto_prepare


@variant("marg")
def marginal_source(img: Image, params: DHRParams, src: str = "gt") -> Plan:
    """The package's Steps 2-3 with the class sizes of the area marginal counted on the ground
    truth (an oracle) in every pass: ``state.init_counts`` from ``gt/`` and no size passes (a
    pass with the same sizes gives the same answer)."""
    if src != "gt":
        raise SystemExit(f"marg: src must be gt (the other sources were screened on 0.4, FINDINGS.md), got {src!r}")
    params = params.replace(size_passes=0)
    state = resume(img.seeded, params)
    state.init_counts = np.bincount(img.gt.ravel(), minlength=256).astype(np.int64)
    return Plan(state, rebalance_heat, params)

