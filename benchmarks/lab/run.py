"""Score Steps 2-3 variants on a labelled val set, from a cached Step 1.

    nice -n 10 .venv/bin/python benchmarks/lab/run.py camvid main lab 'oracle:group=all' -j 2
    nice -n 10 .venv/bin/python benchmarks/lab/run.py ccp main --no-crf -j 2

Prints, per variant, mIoU and vanished (image, class) pairs as ``dhr-label score`` and ``tune``
count them (int64 confusions, ``metrics.vanished_classes``), then the 2-fold cross-validation of
``tune`` over the variants given (``metrics.crossval``, seed 0): the variant chosen on one fold
scored on the other, pooled. Per-variant results are cached (``.cache/<set>/results/``); a
variant's version in ``variants.REGISTRY`` keys them. ``--crf`` (default) runs main's final
DenseCRF; ``--no-crf`` takes the argmax of the upsampled heat maps (screening).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

import common  # noqa: E402
import variants  # noqa: E402
from dhr_label.metrics.crossval import Tally, assign_folds, cross_validate, scores, sum_tallies  # noqa: E402

_JOB: dict = {}  # set in the parent before the workers fork


def result_path(ds: common.DataSet, spec: str, crf: bool) -> Path:
    name = variants.parse(spec)[0]
    key = f"{spec}|crf={crf}|v={variants.REGISTRY[name][1]}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return ds.cache / "results" / f"{name}-{digest}.npz"


def work(image_ids: list[str]) -> list[tuple[str, list]]:
    """A worker's chunk: every missing variant on each image."""
    ds, todo, crf = _JOB["ds"], _JOB["todo"], _JOB["crf"]
    preset, protos = _JOB["preset"], _JOB["prototypes"]
    out = []
    cams, feats = common.open_files(ds)
    with threadpool_limits(1), cams, feats:
        for image_id in image_ids:
            img = common.step1(ds, image_id, cams, feats, preset, protos)
            img.extra = _JOB["extra"]
            rows = []
            for spec in todo:
                t = time.perf_counter()
                mask = variants.mask_of(img, spec, crf)
                seconds = time.perf_counter() - t
                rows.append((*img.score(mask), seconds))
            out.append((image_id, rows))
    return out


def run(ds: common.DataSet, specs: list[str], crf: bool, workers: int, limit: int | None = None, fresh: bool = False):
    """Results per spec: dict(ids, confusion (n, C, C+1), eligible, vanished, seconds)."""
    ids = ds.ids()[:limit] if limit else ds.ids()
    preset = ds.preset()
    results, todo = {}, []
    for spec in specs:
        path = result_path(ds, spec, crf)
        if path.exists() and not fresh and not limit:
            with np.load(path) as z:
                results[spec] = {k: z[k] for k in z.files}
        else:
            todo.append(spec)
    if todo:
        extra = {spec: variants.prepare(ds, spec) for spec in todo}  # dataset-level state, before the fork
        _JOB.update(ds=ds, todo=todo, crf=crf, preset=preset, prototypes=common.prototypes(ds), extra=extra)
        chunks = [ids[i : i + 2] for i in range(0, len(ids), 2)]
        t0 = time.perf_counter()
        if workers > 1:
            with mp.get_context("fork").Pool(workers) as p:
                parts = p.map(work, chunks, chunksize=1)
        else:
            parts = [work(c) for c in chunks]
        print(f"# {len(todo)} variant(s) x {len(ids)} images in {time.perf_counter() - t0:.0f} s on {workers} worker(s)",
              file=sys.stderr)
        per_image = dict(item for part in parts for item in part)
        for v, spec in enumerate(todo):
            rows = [per_image[i][v] for i in ids]
            res = {"ids": np.array(ids), "confusion": np.stack([r[0] for r in rows]), "eligible": np.stack([r[1] for r in rows]),
                   "vanished": np.stack([r[2] for r in rows]), "seconds": np.array([r[3] for r in rows])}
            if not limit:
                path = result_path(ds, spec, crf)
                path.parent.mkdir(parents=True, exist_ok=True)
                np.savez_compressed(path, **res)
            results[spec] = res
    return ids, preset, results


def tallies(res: dict, folds: dict[str, int], k: int, num_classes: int) -> list[Tally]:
    out = [Tally.empty(num_classes) for _ in range(k)]
    for n, image_id in enumerate(res["ids"].tolist()):
        one = Tally(res["confusion"][n], int(res["vanished"][n].sum()), int(res["eligible"][n].sum()), 1)
        out[folds[image_id]] = out[folds[image_id]].add(one)
    return out


def report(ids, preset, results: dict, specs: list[str], per_class: bool, objective: str = "miou") -> dict:
    folds = assign_folds(ids, 2, 0)
    table = {spec: tallies(results[spec], folds, 2, preset.num_classes) for spec in specs}
    summary = {}
    short = [n[:5] for n in preset.classes]
    head = f"{'variant':60s} {'mIoU':>6s} {'van':>4s} {'s/img':>6s}"
    print(head + ("  " + " ".join(f"{n:>5s}" for n in short) if per_class else ""))
    for spec in specs:
        s = scores(sum_tallies(table[spec], preset.num_classes))
        secs = float(results[spec]["seconds"].mean())
        summary[spec] = {"miou": s["miou"] * 100, "vanished": s["vanished"], "pairs": s["pairs"], "seconds": secs,
                         "iou": [None if v is None else v * 100 for v in s["iou"]]}
        line = f"{spec:60s} {s['miou'] * 100:6.2f} {s['vanished']:4d} {secs:6.3f}"
        if per_class:
            line += "  " + " ".join("    -" if v is None else f"{v * 100:5.1f}" for v in s["iou"])
        print(line)
    if len(specs) > 1:
        cv = cross_validate([table[s] for s in specs], objective)
        chosen = [specs[f.chosen] for f in cv.folds]
        print(f"2-fold CV ({objective}, seed 0): pooled held-out {cv.pooled['miou'] * 100:.2f} / {cv.pooled['vanished']}"
              f"  (fold choices: {' | '.join(chosen)}; in-sample best: {specs[cv.chosen]})")
        summary["_cv"] = {"miou": cv.pooled["miou"] * 100, "vanished": cv.pooled["vanished"], "chosen": chosen}
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="camvid, ccp, or NAME=DIR[,CLASSES]")
    parser.add_argument("specs", nargs="+", help="variants, NAME[:key=value,...]")
    parser.add_argument("--crf", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("-j", "--workers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="first N ids only (not cached)")
    parser.add_argument("--fresh", action="store_true", help="recompute cached results")
    parser.add_argument("--per-class", action="store_true")
    parser.add_argument("--objective", default="miou", choices=("miou", "vanished"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    ds = common.dataset(args.data)
    ids, preset, results = run(ds, args.specs, args.crf, args.workers, args.limit, args.fresh)
    print(f"# {ds.name}: {len(ids)} images, final CRF {'on' if args.crf else 'off (argmax)'}")
    summary = report(ids, preset, results, args.specs, args.per_class, args.objective)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
