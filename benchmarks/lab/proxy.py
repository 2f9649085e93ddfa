"""How close each per-image centroid estimator comes to the ground-truth centroid (USS).

    nice -n 10 .venv/bin/python benchmarks/lab/proxy.py camvid [ESTIMATOR ...]

Per (image, class) pair of Gamma with ground truth: the cosine between an estimator's USS
centroid and the CAP centroid of the class's ground-truth region; the mean per class and over
all pairs. A screen for estimators that is far cheaper than scoring masks (no heat maps).
Estimators: ``init`` (CAP over M_init), ``blend`` (0.4: blended with the prototype),
``proto`` (the prototype alone), ``VARIANT:options`` for variants with a ``weights`` hook
(``soft``, ``topk``, ``seedw``: their support, blended as 0.4 blends).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import common  # noqa: E402
import heat as lab_heat  # noqa: E402
import variants  # noqa: E402
from centroids import shrunk_centroids  # noqa: E402
from dhr_label.core.cap import class_cell_fractions, l2_normalise  # noqa: E402
from dhr_label.core.pipeline import prototype_rows  # noqa: E402
from dhr_label.params import DHRParams  # noqa: E402

SUPPORTS = {}  # name -> weights(img, params, default, **options)


def support(name):
    def register(fn):
        SUPPORTS[name] = fn
        return fn
    return register


def estimate(img, spec: str, params: DHRParams) -> np.ndarray:
    state = img.state
    feats = state.uss.reshape(state.uss.shape[0], -1)
    default = class_cell_fractions(state.init, state.classes, state.uss.shape[1:])
    protos, _ = prototype_rows(state, params)
    name, _, rest = spec.partition(":")
    options = dict(item.split("=", 1) for item in filter(None, rest.split(",")))
    options = {k: variants._value(v) for k, v in options.items()}
    if name == "init" and not options:
        return lab_heat.blended(feats, default, None, 0.0)
    if name == "blend":
        return lab_heat.blended(feats, default, protos, params.prototype_weight)
    if name == "proto":
        return protos
    weights = SUPPORTS[name](img, params, default, **options) if name in SUPPORTS else default
    if "k" in options:
        return shrunk_centroids(feats, weights, protos, float(options["k"]))
    blend = float(options.get("w", params.prototype_weight))
    return lab_heat.blended(feats, weights, protos, blend)


def main() -> int:
    ds = common.dataset(sys.argv[1])
    specs = sys.argv[2:] or ["init", "blend", "proto"]
    preset, protos, params = ds.preset(), common.prototypes(ds), DHRParams()
    sums = {s: np.zeros(preset.num_classes) for s in specs}
    counts = np.zeros(preset.num_classes)
    cams, feats = common.open_files(ds)
    with cams, feats:
        for image_id in ds.ids():
            img = common.step1(ds, image_id, cams, feats, preset, protos)
            state = img.state
            if state.next is None:
                continue
            grid = state.uss.shape[1:]
            truth_w = class_cell_fractions(img.gt, state.classes, grid)
            have = truth_w.sum(1) > 0
            truth = l2_normalise(lab_heat.blended(state.uss.reshape(state.uss.shape[0], -1), truth_w, None, 0.0), 1)
            counts[state.classes[have]] += 1
            for s in specs:
                est = l2_normalise(np.asarray(estimate(img, s, params), np.float64), 1)
                sums[s][state.classes[have]] += (est * truth).sum(1)[have]
    names = [n[:5] for n in preset.classes]
    print(f"{'estimator':34s} " + " ".join(f"{n:>5s}" for n in names) + "  pairs-mean")
    for s in specs:
        per = sums[s] / np.maximum(counts, 1)
        print(f"{s:34s} " + " ".join(f"{v:5.3f}" for v in per) + f"  {sums[s].sum() / counts.sum():.4f}")
    return 0


@support("soft")
def _soft(img, params, default, t=0.05, iters=1, prior=0.0, **_):
    w = default
    for _ in range(int(iters)):
        w = ((default + prior) * variants.posterior(variants.uss_cosines(img, params, w), t)).astype(np.float32)
    return w


@support("init")
def _init(img, params, default, **_):
    return default


@support("seedw")
def _seedw(img, params, default, power=1.0, **_):
    return (default * variants.seed_weights(img, img.state.uss.shape[1:]) ** power).astype(np.float32)


if __name__ == "__main__":
    sys.exit(main())
