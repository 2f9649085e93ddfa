"""The Steps 2-3 variants the lab scores: ``NAME[:key=value,...]``.

Every variant maps one :class:`~common.Image` (Step 1 done) to the heat maps of Steps 2-3;
:func:`mask_of` then runs main's ``final_mask`` (the upsampling, the DenseCRF or the argmax,
the guard). ``p.FIELD=VALUE`` in a spec changes a ``DHRParams`` field for that variant
(``p.prototype_weight=0``, ``p.guard=0``, ``p.ot.eps=0.05``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from dhr_label.core import dhr
from dhr_label.core.cap import class_cell_fractions, cosine_maps, minmax
from dhr_label.core.pipeline import prototype_rows
from dhr_label.core.resize import resize_bilinear
from dhr_label.params import DHRParams

import final as lab_final
import heat as lab_heat
from centroids import em_class_model, shrunk_centroids
import model as lab_model
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
    name, options, _ = parse(spec)
    fn = REGISTRY[name][0]
    return fn.prepare(ds, **options) if hasattr(fn, "prepare") else None


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
    if hasattr(fn, "prepare"):
        options["model"] = img.extra[spec]
    final = {k[2:]: options.pop(k) for k in list(options) if k.startswith("f.")}
    heat = fn(img, params, **options)
    if final:  # the lab's Step 3.5 (final.py): a colour model mixed in before the CRF
        return lab_final.final_mask(heat, state.classes, state.init, state.image, params, img.image_crf() if crf else None, **final)
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


# --------------------------------------------------------------------------------------------
# Where a class's centroid support comes from, and robust estimators within the image
# --------------------------------------------------------------------------------------------
def uss_cosines(img: Image, params: DHRParams, weights: np.ndarray) -> np.ndarray:
    """Cosine of every USS cell to every class's (prototype-blended) centroid, G x N."""
    state = img.state
    feats = state.uss.reshape(state.uss.shape[0], -1)
    protos, _ = prototype_rows(state, params)
    return cosine_maps(feats, lab_heat.blended(feats, weights, protos, params.prototype_weight))


def posterior(cos: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax over the classes (rows) of ``cos / temperature``."""
    z = cos / temperature
    z = np.exp(z - z.max(axis=0, keepdims=True))
    return z / z.sum(axis=0, keepdims=True)


@variant("soft")
def soft_support(img: Image, params: DHRParams, t: float = 0.05, iters: int = 1, prior: float = 0.0) -> np.ndarray:
    """Each M_init cell weight of a class times the class's posterior at the cell (softmax over
    Gamma of the cosines to the current centroids, temperature ``t``), re-estimated ``iters``
    times; ``prior`` > 0 also lets cells outside the class's M_init region count, at that weight."""
    def weights(grid, default):
        w = default
        for _ in range(iters):
            post = posterior(uss_cosines(img, params, w), t)
            w = ((default + prior) * post).astype(np.float32)
        return w
    return lab_heat.rebalance_heat(img.state, params, lab_heat.Hooks(weights=weights))


@variant("topk")
def topk_support(img: Image, params: DHRParams, keep: float = 0.5, iters: int = 1) -> np.ndarray:
    """Each class's centroid pooled over the ``keep`` share (by weight) of its M_init cells
    that are most like it (cosine to the current centroid), re-estimated ``iters`` times."""
    def weights(grid, default):
        w = default
        for _ in range(iters):
            cos = uss_cosines(img, params, w)
            new = np.zeros_like(default)
            for g in range(len(default)):
                cells = np.flatnonzero(default[g] > 0)
                if not len(cells):
                    continue
                order = cells[np.argsort(-cos[g, cells], kind="stable")]
                mass = np.cumsum(default[g, order])
                n = int(np.searchsorted(mass, keep * mass[-1])) + 1
                new[g, order[:n]] = default[g, order[:n]]
            w = new
        return w
    return lab_heat.rebalance_heat(img.state, params, lab_heat.Hooks(weights=weights))


def seed_weights(img: Image, grid) -> np.ndarray:
    """Step 1's OT seed scores of Gamma's classes on the grid (bilinear), G x N; 1 for a class
    without a CAM (the background)."""
    state = img.state
    up = resize_bilinear(state.scores, grid).reshape(len(state.labels), -1)
    out = np.ones((len(state.classes), up.shape[1]), np.float32)
    for g, c in enumerate(state.classes.tolist()):
        hit = np.flatnonzero(state.labels == c)
        if len(hit):
            out[g] = np.clip(up[hit[0]], 0.0, 1.0)
    return out


@variant("seedw")
def seed_weighted(img: Image, params: DHRParams, power: float = 1.0, src: str = "init") -> np.ndarray:
    """Centroid support: the M_init (``src`` init) or M_seed (seed) cell fractions times Step 1's
    OT seed score of the class to the ``power`` (0: the fractions alone)."""
    state = img.state

    def weights(grid, default):
        base = default if src == "init" else class_cell_fractions(state.seed, state.classes, grid, mode=params.cap.value)
        return (base * seed_weights(img, grid) ** power).astype(np.float32)
    return lab_heat.rebalance_heat(state, params, lab_heat.Hooks(weights=weights))


# --------------------------------------------------------------------------------------------
# Dataset-level class models (benchmarks/lab/model.py)
# --------------------------------------------------------------------------------------------
def with_prototypes(img: Image, protos):
    return dataclasses.replace(img.state, prototypes=protos)


@variant("proto")
def proto_source(img: Image, params: DHRParams, src: str = "base", gtcls: int = -1, model=None) -> np.ndarray:
    """0.4's Steps 2-3 with the prototypes pooled from another mask source (model.py)."""
    return lab_heat.rebalance_heat(with_prototypes(img, model), params)


def proto_prepare(ds, src="base", gtcls=-1, **_):
    """The prototypes of ``src``; with ``gtcls`` >= 0, that class's rows from the ground truth."""
    protos = lab_model.prototypes_from(ds, src)
    if gtcls < 0:
        return protos
    gt = lab_model.prototypes_from(ds, "gt")
    rows = [a.copy() for a in (protos.uss, *protos.wss)]
    for a, b in zip(rows, (gt.uss, *gt.wss)):
        a[gtcls] = b[gtcls]
    return dataclasses.replace(protos, uss=rows[0], wss=tuple(rows[1:]))


proto_source.prepare = proto_prepare


def lda_prepare(ds, src="base", layers="uss", purity=0.9, shrink=0.1, psrc=None, **_):
    lda = lab_model.fit_lda(ds, src, layers, purity, shrink)
    return lda, (lab_model.prototypes_from(ds, psrc) if psrc else None)


@variant("lda")
def lda_variant(img: Image, params: DHRParams, src: str = "base", layers: str = "uss", purity: float = 0.9,
                shrink: float = 0.1, use: str = "support", t: float = 1.0, a: float = 1.0, w: float = 0.3,
                psrc: str = "", model=None) -> np.ndarray:
    """A class-balanced linear discriminant fitted on the pure cells of ``src`` masks of every
    image; its posterior over Gamma (temperature ``t``) either multiplies the M_init cell
    weights to the power ``a`` (``use`` support), or is mixed into Step 2's heat maps with
    weight ``w`` (term), or both (both). ``psrc``: prototypes pooled from that source."""
    lda, protos = model
    state = with_prototypes(img, protos) if protos is not None else img.state
    post = lab_model.image_posterior(lda, state, layers, t)
    hooks = lab_heat.Hooks(
        weights=(lambda grid, default: (default * post**a).astype(np.float32)) if use in ("support", "both") else None,
        term=(lambda grid: (minmax(post, -1), w)) if use in ("term", "both") else None,
    )
    return lab_heat.rebalance_heat(state, params, hooks)


lda_variant.prepare = lda_prepare


@variant("ppur")
def proto_purified(img: Image, params: DHRParams, src: str = "base", t: float = 0.05, iters: int = 2, space: str = "uss",
                   model=None) -> np.ndarray:
    """0.4's Steps 2-3 with purified prototypes (model.purified_prototypes)."""
    return lab_heat.rebalance_heat(with_prototypes(img, model), params)


proto_purified.prepare = lambda ds, src="base", t=0.05, iters=2, space="uss", **_: lab_model.purified_prototypes(ds, src, t, iters, space)


# --------------------------------------------------------------------------------------------
# The class model: support (M_init, soft posterior) x estimator (fixed blend, shrinkage)
# --------------------------------------------------------------------------------------------
def all_cosines(img: Image, params: DHRParams, weights: np.ndarray) -> np.ndarray:
    """The mean over USS and the WSS layers of the cosines to the (blended) centroids, G x N."""
    state = img.state
    grid = state.uss.shape[1:]
    cos = uss_cosines(img, params, weights)
    _, wss_protos = prototype_rows(state, params)
    for index, layer in enumerate(state.wss):
        feats = resize_bilinear(layer, grid).reshape(layer.shape[0], -1)
        proto = None if wss_protos is None else wss_protos[index]
        cos = cos + cosine_maps(feats, lab_heat.blended(feats, weights, proto, params.prototype_weight))
    return cos / (1 + len(state.wss))


def cm_weights(img: Image, params: DHRParams, sup: str, t: float, iters: int, prior: float, space: str = "uss"):
    if sup == "init":
        return None
    cosines = uss_cosines if space == "uss" else all_cosines

    def weights(grid, default):
        w = default
        for _ in range(iters):
            w = ((default + prior) * posterior(cosines(img, params, w), t)).astype(np.float32)
        return w
    return weights


@variant("cm")
def class_model(img: Image, params: DHRParams, sup: str = "init", t: float = 0.05, iters: int = 1, prior: float = 0.0,
                k: float = -1.0) -> np.ndarray:
    """Support ``sup`` (init: M_init's CAP weights; soft: times the Gamma posterior, see
    ``soft``), estimator: ``k`` < 0 main's fixed blend (``p.prototype_weight``), else
    ``lab centroids.shrunk_centroids`` with kappa = ``k`` cells."""
    centroids = None
    if k >= 0:
        def centroids(features, w, protos, source):
            return shrunk_centroids(features, w, protos, k)
    hooks = lab_heat.Hooks(weights=cm_weights(img, params, sup, t, iters, prior), centroids=centroids)
    return lab_heat.rebalance_heat(img.state, params, hooks)


# --------------------------------------------------------------------------------------------
# The class sizes: the area marginal of the Step 2/3 OT counted on another mask
# --------------------------------------------------------------------------------------------
@variant("marg")
def marginal_source(img: Image, params: DHRParams, src: str = "gt", iters: int = 1, mix: float = 1.0, s: float = 0.3) -> np.ndarray:
    """0.4's Steps 2-3 with the area marginal counted on ``src``: gt (oracle), seed (M_seed),
    base, or heat (the argmax of the upsampled heat maps of the previous pass, ``iters`` passes;
    ``mix`` < 1 takes that share of the pixels' counts from it and the rest from M_init)."""
    state = img.state
    if src in ("heat", "raw"):
        heat = lab_heat.rebalance_heat(state, params, lab_heat.Hooks(final_ot=src == "heat"))
        for _ in range(iters):
            up = resize_bilinear(heat, state.init.shape)
            pred = state.classes[np.argmax(up, axis=0)].astype(np.uint8)
            mask = pred if mix >= 1 else mix_masks(pred, state.init, mix)
            heat = lab_heat.rebalance_heat(state, params, lab_heat.Hooks(marginal_mask=mask))
        return heat
    if src == "supp":  # M_init's pixels where the class's own heat map (before the final OT) reaches ``s``
        raw = resize_bilinear(lab_heat.rebalance_heat(state, params, lab_heat.Hooks(final_ot=False)), state.init.shape)
        lookup = np.full(256, -1)
        lookup[state.classes] = np.arange(len(state.classes))
        slot = lookup[state.init]
        own = np.take_along_axis(raw, np.maximum(slot, 0)[None], 0)[0]
        mask = np.where((slot >= 0) & (own >= s), state.init, 255).astype(np.uint8)
        return lab_heat.rebalance_heat(state, params, lab_heat.Hooks(marginal_mask=mask))
    if src == "and":  # where M_init and M_seed agree
        mask = np.where(state.init == state.seed, state.init, 255).astype(np.uint8)
        return lab_heat.rebalance_heat(state, params, lab_heat.Hooks(marginal_mask=mask))
    if src == "gtbg":  # oracle: the ground truth's background share, M_init's split of the rest
        bg = state.background
        gt_share = float((img.gt == bg).sum()) / max(1, int((img.gt != 255).sum()))
        fg = (state.init != bg) & (state.init != 255)
        mask = mix_masks(np.full_like(state.init, bg), np.where(fg, state.init, 255).astype(np.uint8), 1.0)
        counts = np.bincount(state.init[fg], minlength=256).astype(float)
        total = counts.sum()
        n = state.init.size
        want_bg = gt_share / max(1e-9, 1 - gt_share) * total  # background pixels for that share
        out = np.full(n, 255, np.uint8)
        order = np.concatenate([np.repeat(np.arange(256), counts.astype(int))])
        out[: len(order)] = order
        out[len(order): len(order) + min(n - len(order), int(want_bg))] = bg
        return lab_heat.rebalance_heat(state, params, lab_heat.Hooks(marginal_mask=out.reshape(state.init.shape)))
    mask = {"gt": img.gt, "seed": state.seed, "base": state.base}[src]
    return lab_heat.rebalance_heat(state, params, lab_heat.Hooks(marginal_mask=mask))


def mix_masks(a: np.ndarray, b: np.ndarray, share: float) -> np.ndarray:
    """A mask whose class counts are ``share`` of ``a``'s plus the rest of ``b``'s: every pixel
    of a regular checker takes ``a`` at that density (only the counts matter to the marginal)."""
    pick = (np.arange(a.size).reshape(a.shape) * 0.6180339887 % 1.0) < share
    return np.where(pick, a, b).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# A discriminative heat-map term: each class against the image's other classes
# --------------------------------------------------------------------------------------------
@variant("post")
def posterior_term(img: Image, params: DHRParams, t: float = 0.05, w: float = 0.3, src: str = "uss") -> np.ndarray:
    """Step 2's heat maps mixed (weight ``w``) with the posterior over Gamma: the softmax of the
    cosines of every cell to the image's (blended) centroids at temperature ``t`` (USS, or the
    mean of the USS and WSS cosines with ``src`` all), min-max per class."""
    state = img.state

    def term(grid):
        default = class_cell_fractions(state.init, state.classes, grid, mode=params.cap.value)
        cos = uss_cosines(img, params, default)
        if src == "all":
            _, wss_protos = prototype_rows(state, params)
            for index, layer in enumerate(state.wss):
                feats = resize_bilinear(layer, grid).reshape(layer.shape[0], -1)
                proto = None if wss_protos is None else wss_protos[index]
                cos = cos + cosine_maps(feats, lab_heat.blended(feats, default, proto, params.prototype_weight))
            cos = cos / (1 + len(state.wss))
        return minmax(posterior(cos, t), -1), w
    return lab_heat.rebalance_heat(state, params, lab_heat.Hooks(term=term))


@variant("temper")
def tempered_marginal(img: Image, params: DHRParams, g: float = 0.5, floor: float = -1.0) -> np.ndarray:
    """The area marginal tempered: shares ** ``g`` renormalised (0 uniform, 1 area), floored at
    ``floor`` (default ``p.marginal_floor``) after tempering."""
    low = params.marginal_floor if floor < 0 else floor

    def shares(classes, counts):
        if counts.sum() == 0:
            return None
        v = (counts / counts.sum()) ** g
        v = np.maximum(v / v.sum(), low)
        return v / v.sum()
    return lab_heat.rebalance_heat(img.state, params, lab_heat.Hooks(shares=shares))


@variant("em")
def em_variant(img: Image, params: DHRParams, kappa: float = 20.0, eps: float = 0.1, iters: int = 3,
               area: str = "em", sup: str = "em") -> np.ndarray:
    """centroids.em_class_model on the USS cells: its responsibilities as every source's CAP
    weights (``sup`` em; init: M_init's), its class shares as the area marginal (``area`` em;
    init: M_init's counts), floored as ``p.marginal_floor``."""
    state = img.state
    grid = state.uss.shape[1:]
    frac = class_cell_fractions(state.init, state.classes, grid, mode=params.cap.value)
    protos, _ = prototype_rows(state, params)
    r, pi = em_class_model(state.uss.reshape(state.uss.shape[0], -1), frac, protos, params.prototype_weight,
                           kappa, eps, iters)
    index = {c: i for i, c in enumerate(state.classes.tolist())}

    def shares(classes, counts):
        v = np.maximum(pi[[index[c] for c in classes.tolist()]], 0.0)
        v = np.maximum(v / v.sum(), params.marginal_floor)
        return v / v.sum()
    hooks = lab_heat.Hooks(weights=(lambda grid, default: r) if sup == "em" else None,
                           shares=shares if area == "em" else None)
    return lab_heat.rebalance_heat(state, params, hooks)


@variant("ukl")
def unbalanced_area(img: Image, params: DHRParams, kl: float = 0.3) -> np.ndarray:
    """The Step 2/3 OT with the area marginal KL-relaxed (unbalanced OT, weight ``kl``): the
    class masses follow the scores where M_init's class sizes are wrong."""
    params = params.replace(marginal_kl=kl)
    state = img.state
    return lab_heat.rebalance_heat(state, params, lab_heat.Hooks(kl=True))


# --------------------------------------------------------------------------------------------
# Rounds within the image: the centroids re-estimated from Steps 2-3's own first answer
# --------------------------------------------------------------------------------------------
@variant("round")
def image_rounds(img: Image, params: DHRParams, rounds: int = 1, m: float = 1.0, area: str = "init") -> np.ndarray:
    """``rounds`` more passes of Steps 2-3, each pooling its centroids (every source) over
    ``(1 - m) f_init + m f_pred``: f_pred the soft cell fractions of the previous pass's answer
    (the argmax of its upsampled heat maps), f_init M_init's; the area marginal counted on M_init
    (``area`` init) or on that answer (pred). The guard still restores from M_init."""
    state = img.state
    heat = lab_heat.rebalance_heat(state, params)
    for _ in range(rounds):
        pred = state.classes[np.argmax(resize_bilinear(heat, state.init.shape), axis=0)].astype(np.uint8)
        pred[state.init == 255] = 255  # ignore stays ignore, as in M_init

        def weights(grid, default, pred=pred):
            return ((1 - m) * default + m * class_cell_fractions(pred, state.classes, grid, mode=params.cap.value)).astype(np.float32)
        heat = lab_heat.rebalance_heat(state, params, lab_heat.Hooks(weights=weights, marginal_mask=pred if area == "pred" else None))
    return heat


# --------------------------------------------------------------------------------------------
# The dataset's own discriminative class model, the CAMs, as a heat-map term
# --------------------------------------------------------------------------------------------
def cam_maps(img: Image, params: DHRParams, grid, src: str) -> np.ndarray:
    """Gamma's CAM evidence on the grid, G x N in [0, 1]: Step 1's OT seed scores (``src``
    scores) or the ReLU'd, max-normalised CAMs (cam), bilinear; the background (no CAM) gets
    ``(1 - max_k A_k) ** gamma`` as Step 1 gives it; a class without either, 0."""
    state = img.state
    if src == "scores":
        a = state.scores
    else:
        a = np.maximum(state.cam.astype(np.float32), 0)
        a = a / np.maximum(a.reshape(len(a), -1).max(1), 1e-5)[:, None, None]
    up = np.clip(resize_bilinear(a, grid).reshape(len(state.labels), -1), 0, 1)
    out = np.zeros((len(state.classes), up.shape[1]), np.float32)
    for g, c in enumerate(state.classes.tolist()):
        hit = np.flatnonzero(state.labels == c)
        if len(hit):
            out[g] = up[hit[0]]
        elif c == state.background:
            out[g] = np.clip(1 - up.max(0), 0, 1) ** params.gamma
    return out


@variant("camterm")
def cam_term(img: Image, params: DHRParams, w: float = 0.2, src: str = "scores") -> np.ndarray:
    """Step 2's heat maps mixed (weight ``w``) with the CAM evidence of ``cam_maps``."""
    return lab_heat.rebalance_heat(img.state, params, lab_heat.Hooks(term=lambda grid: (minmax(cam_maps(img, params, grid, src), -1), w)))


# --------------------------------------------------------------------------------------------
# Combinations
# --------------------------------------------------------------------------------------------
@variant("combo")
def combo(img: Image, params: DHRParams, sup: str = "init", t: float = 0.05, prior: float = 0.1, iters: int = 0,
          rounds: int = 0, m: float = 1.0, cam: float = 0.0, model=None) -> np.ndarray:
    """Support ``sup`` (init | soft: the Gamma posterior at temperature ``t`` with ``prior`` |
    lda: the base-mask discriminant's posterior), then ``iters`` passes that count the area
    marginal on the previous pass's argmax (marg:src=heat), ``rounds`` passes that pool the
    centroids over the previous answer (round, share ``m``), ``cam`` > 0 mixes the seed scores
    into Step 2's heat maps (camterm)."""
    state = img.state
    grid = state.uss.shape[1:]
    if not params.steps.uss:  # the support is the USS posterior (winner.py): rows without USS keep M_init's
        support = None
    elif sup in ("soft", "softall"):
        support = cm_weights(img, params, "soft", t, 1, prior, "uss" if sup == "soft" else "all")
    elif sup == "lda":
        post = lab_model.image_posterior(model, state, "uss")
        support = lambda g, default: (default * post).astype(np.float32)  # noqa: E731
    else:
        support = None
    term = (lambda g: (minmax(cam_maps(img, params, g, "scores"), -1), cam)) if cam > 0 else None
    hooks = lab_heat.Hooks(weights=support, term=term)
    heat = lab_heat.rebalance_heat(state, params, hooks)
    area = None
    for _ in range(iters):
        area = state.classes[np.argmax(resize_bilinear(heat, state.init.shape), axis=0)].astype(np.uint8)
        heat = lab_heat.rebalance_heat(state, params, dataclasses.replace(hooks, marginal_mask=area))
    for _ in range(rounds):
        pred = state.classes[np.argmax(resize_bilinear(heat, state.init.shape), axis=0)].astype(np.uint8)
        pred[state.init == 255] = 255

        def weights(g, default, pred=pred):
            mixed = (1 - m) * default + m * class_cell_fractions(pred, state.classes, g, mode=params.cap.value)
            return mixed if support is None else support(g, mixed)
        heat = lab_heat.rebalance_heat(state, params, dataclasses.replace(hooks, weights=weights, marginal_mask=area))
    return heat


combo.prepare = lambda ds, sup="init", **_: lab_model.fit_lda(ds, "base", "uss", 0.9, 0.1) if sup == "lda" else None
