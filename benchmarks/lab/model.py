"""Dataset-level class models of the lab: prototypes and linear discriminants pooled over every
image of a set from a chosen mask source, cached in ``.cache/<set>/``.

Mask sources: ``base`` (the base masks: inputs, what refine pools its prototypes from),
``init0`` (Step 1 without its DenseCRF: the OT seed's argmax integrated into the base mask --
cheap, no CRF), ``init`` / ``seed`` (Step 1's M_init / M_seed, from the cache), ``gt`` (the
ground truth: an oracle).
"""
from __future__ import annotations

import numpy as np

import common
from dhr_label.core.cap import class_cell_fractions, l2_normalise
from dhr_label.core.dhr import integrate, seed_probs
from dhr_label.core.prototypes import Prototypes, add_sums, finish, image_sums
from dhr_label.core.resize import resize_bilinear
from dhr_label.io.masks import read_mask


def source_mask(ds, img: common.Image, source: str) -> np.ndarray:
    state = img.state
    if source == "gt":
        return read_mask(ds.root / "gt" / f"{img.image_id}.png")
    if source == "base":
        return state.base
    if source == "init":
        return state.init
    if source == "seed":
        return state.seed
    if source == "init0":
        probs, ids = seed_probs(state.scores, state.labels, state.background, state.size, img.params.gamma)
        seed = ids[np.argmax(probs, axis=0)].astype(np.uint8)
        return integrate(seed, state.base, state.labels, img.params.rho)[0]
    raise ValueError(f"unknown mask source {source!r}")


def images(ds):
    """Every image of ``ds`` with Step 1 (cached), in id order."""
    preset = ds.preset()
    protos = common.prototypes(ds)
    cams, feats = common.open_files(ds)
    with cams, feats:
        for image_id in ds.ids():
            yield common.step1(ds, image_id, cams, feats, preset, protos)


def prototypes_from(ds, source: str) -> Prototypes:
    """Prototypes pooled as refine pools them (``core.prototypes.image_sums``), from ``source``."""
    path = ds.cache / f"prototypes-{source}.npz"
    if path.exists():
        with np.load(path) as z:
            layers = sorted((n for n in z.files if n.startswith("wss_")), key=lambda n: int(n[4:]))
            return Prototypes(uss=z["uss"], wss=tuple(z[n] for n in layers))
    total, num_classes = None, ds.preset().num_classes
    for img in images(ds):
        total = add_sums(total, image_sums(source_mask(ds, img, source), img.state.uss, img.state.wss, num_classes))
    p = finish(total)
    np.savez(path, uss=p.uss, **{f"wss_{k}": layer for k, layer in enumerate(p.wss)})
    return p


def unit_sources(state) -> list[np.ndarray]:
    """The image's feature sources on the USS grid, L2-normalised per cell: USS, then each WSS
    layer (resized as Step 3.2 does), each D_s x N float64."""
    grid = state.uss.shape[1:]
    sources = [state.uss] + [resize_bilinear(layer, grid) for layer in state.wss]
    return [l2_normalise(s.reshape(s.shape[0], -1).astype(np.float64), 0) for s in sources]


def pooling_weights(ds, img, source: str, num_classes: int) -> np.ndarray:
    """C x N cell weights of a pooling source on the USS grid: a mask source's soft fractions,
    or ``score<P>``: Step 1's OT seed score of each tag to the power P (bilinear to the grid;
    a class without a CAM, the background, keeps its base-mask fractions), or
    ``SRC*score<P>``: a mask source's fractions times the tags' seed scores to the power P."""
    state = img.state
    grid = state.uss.shape[1:]
    if source.startswith("peak"):  # the tags' cells whose seed score reaches the threshold
        up = np.clip(resize_bilinear(state.scores, grid).reshape(len(state.labels), -1), 0, 1)
        weights = class_cell_fractions(state.base, np.arange(num_classes), grid).astype(np.float64)
        weights[state.labels] = (up >= float(source[4:])).astype(np.float64)
        if state.background is not None:  # the background where no tag's seed reaches it
            weights[state.background] *= up.max(0) < float(source[4:])
        return weights
    if "score" not in source:
        return class_cell_fractions(source_mask(ds, img, source), np.arange(num_classes), grid).astype(np.float64)
    mask_source, _, power = source.partition("score")
    power = float(power or 1)
    up = np.clip(resize_bilinear(state.scores, grid).reshape(len(state.labels), -1), 0, 1).astype(np.float64) ** power
    if mask_source:
        weights = class_cell_fractions(source_mask(ds, img, mask_source.rstrip("*")), np.arange(num_classes), grid).astype(np.float64)
        weights[state.labels] *= up
        return weights
    weights = class_cell_fractions(state.base, np.arange(num_classes), grid).astype(np.float64)
    tags = np.zeros(num_classes, bool)
    tags[state.labels] = True
    weights[tags] = 0.0
    weights[state.labels] = up
    return weights


def purified_prototypes(ds, source: str, temperature: float, iters: int, space: str = "uss") -> Prototypes:
    """Prototypes re-estimated ``iters`` times: each cell of a class's ``source`` region counts
    by its soft fraction times the class's posterior at the cell -- the softmax, over the image's
    classes (Gamma), of the cosines to the current prototypes over ``temperature`` (cosines of the
    USS source, or the mean over all sources with ``space`` all). Cells of a blob that look like a
    neighbour class go to that class's explanation and leave the prototype."""
    path = ds.cache / f"prototypes-{source}-pur-{temperature}-{iters}-{space}.npz"
    if path.exists():
        with np.load(path) as z:
            layers = sorted((n for n in z.files if n.startswith("wss_")), key=lambda n: int(n[4:]))
            return Prototypes(uss=z["uss"], wss=tuple(z[n] for n in layers))
    num_classes = ds.preset().num_classes

    def passes():  # the features are re-read each pass: all of them would not fit in memory
        for img in images(ds):
            yield unit_sources(img.state), pooling_weights(ds, img, source, num_classes)

    sums = None
    for sources, frac in passes():
        sums = add_sums(sums, [(frac @ x.T, frac.sum(1)) for x in sources])
    protos = finish(sums)
    for _ in range(iters):
        rows = [protos.uss] + list(protos.wss)
        sums = None
        for sources, frac in passes():
            present = np.flatnonzero(frac.sum(1) > 0)
            cos = [l2_normalise(r[present].astype(np.float64), 1) @ x for r, x in zip(rows, sources)]
            cos = cos[0] if space == "uss" else sum(cos) / len(cos)
            z = cos / temperature
            post = np.exp(z - z.max(0, keepdims=True))
            post /= post.sum(0, keepdims=True)
            weights = np.zeros_like(frac, dtype=np.float64)
            weights[present] = frac[present] * post
            sums = add_sums(sums, [(weights @ x.T, weights.sum(1)) for x in sources])
        protos = finish(sums)
    np.savez(path, uss=protos.uss, **{f"wss_{k}": layer for k, layer in enumerate(protos.wss)})
    return protos


def cell_features(state, layers: str) -> np.ndarray:
    """The features of the discriminant on the USS grid, D x N: each source L2-normalised per
    cell (``uss``, ``c4`` = WSS layer 0, ``c5`` = WSS layer 1, joined by ``+``)."""
    grid = state.uss.shape[1:]
    parts = []
    for name in layers.split("+"):
        source = state.uss if name == "uss" else resize_bilinear(state.wss[{"c4": 0, "c5": 1}[name]], grid)
        parts.append(l2_normalise(source.reshape(source.shape[0], -1).astype(np.float64), 0))
    return np.concatenate(parts, axis=0)


class LDA:
    """Class-balanced linear discriminant: ``g_c(x) = m_c' P x - m_c' P m_c / 2``, P the inverse
    of the pooled within-class covariance (each class weighted alike), shrunk towards its mean
    variance by ``shrink``."""

    def __init__(self, means: np.ndarray, precision: np.ndarray, seen: np.ndarray):
        self.w = means @ precision  # C x D
        self.b = -0.5 * np.einsum("cd,cd->c", self.w, means)
        self.seen = seen

    def scores(self, x: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """G x N discriminant values of ``classes`` at the cells ``x`` (D x N)."""
        return self.w[classes] @ x + self.b[classes][:, None]


def fit_lda(ds, source: str, layers: str, purity: float, shrink: float) -> LDA:
    path = ds.cache / f"lda-{source}-{layers}-{purity}.npz"
    if path.exists():
        with np.load(path) as z:
            mass, sums, outer = z["mass"], z["sums"], z["outer"]
    else:
        num_classes = ds.preset().num_classes
        mass = sums = outer = None
        for img in images(ds):
            x = cell_features(img.state, layers)  # D x N
            frac = class_cell_fractions(source_mask(ds, img, source), np.arange(num_classes), img.state.uss.shape[1:])
            pure = (frac >= purity).astype(np.float64)  # C x N: cells (almost) all of one class
            if mass is None:
                d = x.shape[0]
                mass, sums, outer = np.zeros(num_classes), np.zeros((num_classes, d)), np.zeros((num_classes, d, d))
            mass += pure.sum(1)
            sums += pure @ x.T
            for c in np.flatnonzero(pure.sum(1)):
                xc = x[:, pure[c] > 0]
                outer[c] += xc @ xc.T
        np.savez(path, mass=mass, sums=sums, outer=outer)
    seen = mass > 0
    means = sums / np.maximum(mass, 1)[:, None]
    cov = sum((outer[c] / mass[c] - np.outer(means[c], means[c])) for c in np.flatnonzero(seen)) / seen.sum()
    cov = (1 - shrink) * cov + shrink * np.trace(cov) / len(cov) * np.eye(len(cov))
    return LDA(means, np.linalg.inv(cov), seen)


def image_posterior(model: LDA, state, layers: str, temperature: float = 1.0) -> np.ndarray:
    """Softmax over Gamma of the discriminant (the classes of the image only), G x N."""
    g = model.scores(cell_features(state, layers), state.classes) / temperature
    g = np.where(model.seen[state.classes][:, None], g, -np.inf)
    g = np.exp(g - g.max(axis=0, keepdims=True))
    return (g / g.sum(axis=0, keepdims=True)).astype(np.float32)


__all__ = ["LDA", "fit_lda", "image_posterior", "prototypes_from", "source_mask"]
