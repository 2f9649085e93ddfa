"""The Steps 2-3 variants the lab scores: ``NAME[:key=value,...]``.

Every variant maps one :class:`~common.Image` (Step 1 done) to the heat maps of Steps 2-3;
:func:`mask_of` then runs main's ``final_mask`` (the upsampling, the DenseCRF or the argmax,
the guard). ``p.FIELD=VALUE`` in a spec changes a ``DHRParams`` field for that variant
(``p.prototype_weight=0``, ``p.guard=0``, ``p.ot.eps=0.05``).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dhr_label.core import dhr
from dhr_label.core.cap import class_cell_fractions
from dhr_label.params import DHRParams

import heat as lab_heat
from common import Image

REGISTRY: dict[str, tuple[Callable, str]] = {}  # name -> (function, version: bump to drop cached results)


def variant(name: str, version: str = "1"):
    def register(fn):
        REGISTRY[name] = (fn, version)
        return fn
    return register


def parse(spec: str) -> tuple[str, dict, dict]:
    """``name:k=v,...`` -> (name, variant options, DHRParams changes)."""
    name, _, rest = spec.partition(":")
    if name not in REGISTRY:
        raise SystemExit(f"unknown variant {name!r}; known: {', '.join(sorted(REGISTRY))}")
    options, changes = {}, {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        parsed = _value(value)
        if key.startswith("p."):
            changes[key[2:]] = parsed
        else:
            options[key] = parsed
    return name, options, changes


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def params_of(changes: dict) -> DHRParams:
    return DHRParams().with_values(changes) if changes else DHRParams()


def mask_of(img: Image, spec: str, crf: bool) -> np.ndarray:
    """The final mask of variant ``spec`` for ``img`` (M_init where Steps 2-3 do not run)."""
    name, options, changes = parse(spec)
    params = params_of(changes)
    state = img.state
    if state.next is None:
        return state.init
    fn = REGISTRY[name][0]
    heat = fn(img, params, **options)
    mask, _ = dhr.final_mask(heat, state.classes, state.init, params, img.image_crf() if crf else None)
    return mask


# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------
@variant("main")
def main_heat(img: Image, params: DHRParams) -> np.ndarray:
    """main's ``rebalance_heat`` itself (0.4's defaults unless ``p.`` changes them)."""
    return dhr.rebalance_heat(img.state, params)[0]


@variant("lab")
def lab_default(img: Image, params: DHRParams) -> np.ndarray:
    """The lab's copy of Steps 2-3 without hooks: must equal ``main``."""
    return lab_heat.rebalance_heat(img.state, params)


# --------------------------------------------------------------------------------------------
# The oracle ladder: ground-truth centroids for some classes
# --------------------------------------------------------------------------------------------
def oracle_classes(img: Image, which: str, cls: int | None, large: float) -> np.ndarray:
    """Which slots of Gamma get ground-truth centroids: all, large (>= ``large`` of M_init's
    labelled pixels), small, or one class id; only classes with ground-truth pixels."""
    state = img.state
    counts = np.bincount(state.init.ravel(), minlength=256)[state.classes].astype(float)
    share = counts / max(1, int((state.init != 255).sum()))
    in_gt = np.bincount(img.gt.ravel(), minlength=256)[state.classes] > 0
    pick = {"all": np.ones(len(share), bool), "large": share >= large, "small": share < large,
            "one": state.classes == cls}[which]
    return pick & in_gt


@variant("oracle")
def oracle(img: Image, params: DHRParams, group: str = "all", cls: int = -1, large: float = 0.05,
           mode: str = "blend") -> np.ndarray:
    """CAP over the ground-truth regions for the chosen classes (``group`` all|large|small|one,
    ``cls`` for one); ``mode`` blend: blended with the prototype as the defaults blend M_init's
    centroid; alone: the ground-truth centroid as it is (other classes keep the default)."""
    state = img.state
    pick = oracle_classes(img, group, cls, large)

    def weights(grid, default):
        truth = class_cell_fractions(img.gt, state.classes, grid, mode=params.cap.value)
        return np.where(pick[:, None], truth, default).astype(np.float32)

    def centroids(features, w, protos, source):
        mixed = lab_heat.blended(features, w, protos, params.prototype_weight)
        if mode == "blend":
            return mixed
        own = lab_heat.blended(features, w, None, 0.0)
        unit = own / np.maximum(np.linalg.norm(own, axis=1, keepdims=True), 1e-8)
        return np.where(pick[:, None], unit, mixed)

    return lab_heat.rebalance_heat(state, params, lab_heat.Hooks(weights=weights, centroids=centroids))
