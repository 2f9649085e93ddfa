"""The paper's Table 6 on a real benchmark: the seven ablation rows of DHR, scored against GT.

    python benchmarks/table6.py /work/shared/data/camvid-val [--workers 2] [--limit N] [--cap soft]

Prints, per row: mIoU, per-class IoU, the vanished rate ((image, class) pairs with the class
covering >= 0.1 % of the image's labelled GT pixels and a per-image IoU < 0.1) and the compute
time. Step 1 is computed once per image and shared by the rows that use it, exactly as each
row would compute it alone (same functions, same parameters). Any DHRParams field can be
changed with --set name=value (e.g. --set marginal_rebalance=uniform --set rho=0.3).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed
from PIL import Image

from dhr_label.core.crf import ImageCRF
from dhr_label.core.dhr import integrate, rebalance, seed_mask, seed_scores
from dhr_label.io.contract import CamsFile, FeatsFile
from dhr_label.params import CapMode, DHRParams, Marginal, OTParams, Steps

ROWS = (1, 2, 3, 4, 5, 6, 7)
VANISH_IOU = 0.1
VANISH_MIN_SHARE = 0.001


def parse_set(items: list[str]) -> DHRParams:
    """DHRParams with ``name=value`` overrides (``ot.eps=0.05`` for nested fields)."""
    top, ot = {}, {}
    kinds = {"cap": CapMode, "marginal_rebalance": Marginal, "marginal_init": Marginal}
    for item in items:
        name, _, value = item.partition("=")
        if name.startswith("ot."):
            ot[name[3:]] = type(getattr(OTParams(), name[3:]))(value)
        elif name in kinds:
            top[name] = kinds[name](value)
        else:
            top[name] = type(getattr(DHRParams(), name))(value)
    return DHRParams(ot=OTParams(**ot), **top)


def confusion(gt: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    """n x n int64 confusion (rows GT, columns prediction); GT 255 ignored, bad ids -> wrong."""
    keep = gt != 255
    g = gt[keep].astype(np.int64)
    p = pred[keep].astype(np.int64)
    p = np.where(p < n, p, n)  # an id outside the classes is never right
    return np.bincount(g * (n + 1) + p, minlength=n * (n + 1)).reshape(n, n + 1)[:, :n]


def one_image(data: Path, image_id: str, params: DHRParams, n_classes: int) -> dict:
    """Every row's confusion matrix and compute time for one image."""
    with CamsFile.open(data / "cams.h5") as cams, FeatsFile.open(data / "feats.h5") as feats:
        cam, labels = cams.read_cam(image_id)
        base, image = cams.read_base(image_id), cams.read_image(image_id)
        background = cams.background
        uss = feats.read_uss(image_id)
        wss = [layer for _, layer in feats.read_wss(image_id)]
    gt = np.asarray(Image.open(data / "gt" / f"{image_id}.png"))
    masks, seconds = {1: base}, {1: 0.0}
    crf = ImageCRF(image, params.crf)

    def step1(ot: bool, use_crf: bool):
        p = params.replace(steps=Steps(ot=ot, crf=use_crf, uss=False, wss=False))
        t = time.perf_counter()
        seed = seed_mask(seed_scores(cam, p, base, labels), labels, background, p, crf)
        init, _ = integrate(seed, base, labels, p.rho)
        return init, time.perf_counter() - t

    masks[2], seconds[2] = step1(True, False)
    masks[3], seconds[3] = step1(False, True)
    masks[4], seconds[4] = step1(True, True)
    for row in (5, 6, 7):
        p = params.replace(steps=Steps.row(row))
        t = time.perf_counter()
        masks[row], _, _ = rebalance(masks[4], uss, wss, p, crf)
        seconds[row] = seconds[4] + time.perf_counter() - t
    return {
        "id": image_id,
        "confusion": {r: confusion(gt, masks[r], n_classes) for r in ROWS},
        "seconds": seconds,
    }


def vanished(per_image: list[np.ndarray]) -> tuple[int, int, np.ndarray]:
    """(vanished pairs, eligible pairs, vanished per class) from per-image confusions."""
    n = per_image[0].shape[0]
    count, total, by_class = 0, 0, np.zeros(n, dtype=np.int64)
    for cm in per_image:
        gt_pixels = cm.sum(axis=1)
        labelled = gt_pixels.sum()
        inter = np.diag(cm)
        union = gt_pixels + cm.sum(axis=0) - inter
        for c in np.nonzero(gt_pixels >= VANISH_MIN_SHARE * labelled)[0]:
            if gt_pixels[c] == 0:
                continue
            total += 1
            if inter[c] / union[c] < VANISH_IOU:
                count += 1
                by_class[c] += 1
    return count, total, by_class


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="a benchmark folder with cams.h5, feats.h5, gt/")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    params = parse_set(args.set)
    with CamsFile.open(args.data / "cams.h5") as cams:
        ids, classes = cams.ids(), cams.classes
    ids = ids[: args.limit] if args.limit else ids
    n = len(classes)
    start = time.perf_counter()
    results = Parallel(n_jobs=args.workers)(delayed(one_image)(args.data, i, params, n) for i in ids)
    wall = time.perf_counter() - start
    print(f"# {len(ids)} images of {args.data}, {args.workers} workers, wall {wall:.1f} s", file=sys.stderr)
    print(f"# parameters: {json.dumps(params.to_dict())}", file=sys.stderr)
    header = f"{'row':>3} {'mIoU':>6} {'vanished':>14} {'s/img':>6}  " + " ".join(f"{c[:6]:>6}" for c in classes)
    print(header)
    report = {}
    for row in ROWS:
        cms = [r["confusion"][row] for r in results]
        total = np.sum(cms, axis=0)
        inter = np.diag(total).astype(np.float64)
        union = total.sum(0) + total.sum(1) - inter
        iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
        v, e, _ = vanished(cms)
        secs = float(np.mean([r["seconds"][row] for r in results]))
        print(
            f"{row:>3} {100 * np.nanmean(iou):6.2f} {v:>5}/{e:<5} {100 * v / e:3.0f}% {secs:6.2f}  "
            + " ".join(f"{100 * x:6.1f}" for x in iou)
        )
        report[row] = {"miou": 100 * float(np.nanmean(iou)), "iou": (100 * iou).tolist(), "vanished": v, "pairs": e, "seconds_per_image": secs}
    if args.json:
        args.json.write_text(json.dumps({"params": params.to_dict(), "images": len(ids), "rows": report}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
