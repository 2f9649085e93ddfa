"""Choose Step 2/3 defaults on a validation split: rows 5-7 for many parameter variants.

    python benchmarks/sweep.py /work/shared/data/camvid-val \
        --variant base: --variant tau07:tau=0.7 --variant guard:guard=0.5 [--workers 2]

Step 1 (row 4, M_init) is computed once per image with the Step-1 parameters and cached under
--cache, so each variant costs only the rebalancing and its CRF. A variant is ``name:`` followed
by comma-separated ``field=value`` settings of DHRParams (``ot.eps=...`` for nested fields);
every variant must keep the Step-1 parameters of the cache. Prints, per variant and row: mIoU,
vanished pairs, and the per-class IoU.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from table6 import confusion, parse_set, vanished  # noqa: E402

from dhr_label.core.crf import ImageCRF  # noqa: E402
from dhr_label.core.dhr import integrate, rebalance, seed_mask, seed_scores  # noqa: E402
from dhr_label.io.contract import CamsFile, FeatsFile  # noqa: E402
from dhr_label.params import DHRParams, Steps  # noqa: E402

STEP1_FIELDS = ("ot", "crf", "gamma", "rho", "marginal_init", "marginal_floor")


def step1_key(params: DHRParams) -> str:
    d = params.to_dict()
    return hashlib.sha1(json.dumps({k: d[k] for k in STEP1_FIELDS}, sort_keys=True).encode()).hexdigest()[:12]


def one_image(data: Path, image_id: str, variants: dict[str, DHRParams], rows, cache: Path, n: int) -> dict:
    first = next(iter(variants.values()))
    with CamsFile.open(data / "cams.h5") as cams, FeatsFile.open(data / "feats.h5") as feats:
        cam, labels = cams.read_cam(image_id)
        base, image, background = cams.read_base(image_id), cams.read_image(image_id), cams.background
        uss = feats.read_uss(image_id)
        wss = [layer for _, layer in feats.read_wss(image_id)]
    gt = np.asarray(Image.open(data / "gt" / f"{image_id}.png"))
    crf = ImageCRF(image, first.crf)
    cached = cache / f"{image_id}.npy"
    if cached.exists():
        init = np.load(cached)
    else:
        p = first.replace(steps=Steps.row(4))
        seed = seed_mask(seed_scores(cam, p, base, labels), labels, background, p, crf)
        init, _ = integrate(seed, base, labels, p.rho)
        np.save(cached, init)
    out = {"row4": confusion(gt, init, n)}
    for name, params in variants.items():
        for row in rows:
            mask, _, _ = rebalance(init, uss, wss, params.replace(steps=Steps.row(row)), crf)
            out[f"{name}/{row}"] = confusion(gt, mask, n)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--variant", action="append", required=True, metavar="NAME:F=V,F=V")
    parser.add_argument("--rows", default="5,6,7")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/dhr-sweep-cache"))
    args = parser.parse_args()
    variants = {}
    for text in args.variant:
        name, _, settings = text.partition(":")
        variants[name] = parse_set([s for s in settings.split(",") if s])
    keys = {step1_key(p) for p in variants.values()}
    if len(keys) != 1:
        parser.error("all variants must share the Step-1 parameters (one cache)")
    cache = args.cache / keys.pop()
    cache.mkdir(parents=True, exist_ok=True)
    rows = [int(r) for r in args.rows.split(",")]
    with CamsFile.open(args.data / "cams.h5") as cams:
        ids, classes = cams.ids(), cams.classes
    ids = ids[: args.limit] if args.limit else ids
    start = time.perf_counter()
    results = Parallel(n_jobs=args.workers)(
        delayed(one_image)(args.data, i, variants, rows, cache, len(classes)) for i in ids
    )
    print(f"# {len(ids)} images, wall {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(f"{'variant/row':>16} {'mIoU':>6} {'vanished':>9}  " + " ".join(f"{c[:6]:>6}" for c in classes))
    for key in results[0]:
        cms = [r[key] for r in results]
        total = np.sum(cms, axis=0)
        inter = np.diag(total).astype(np.float64)
        iou = inter / np.maximum(total.sum(0) + total.sum(1) - inter, 1)
        v, e, _ = vanished(cms)
        print(f"{key:>16} {100 * iou.mean():6.2f} {v:>4}/{e:<4}  " + " ".join(f"{100 * x:6.1f}" for x in iou))
    return 0


if __name__ == "__main__":
    sys.exit(main())
