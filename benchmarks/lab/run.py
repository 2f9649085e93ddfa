"""Score Steps 2-3 variants on a labelled val set, from a cached Step 1.

    nice -n 10 .venv/bin/python benchmarks/lab/run.py camvid main 'oracle:group=all,mode=alone' -j 2
    nice -n 10 .venv/bin/python benchmarks/lab/run.py ccp main 'main:p.size_passes=0' --no-crf -j 2

Prints, per variant, mIoU and vanished (image, class) pairs as ``dhr-label score`` and ``tune``
count them (int64 confusions, ``metrics.vanished_classes``), then the 2-fold cross-validation of
``tune`` over the variants given (``metrics.crossval``, seed 0): the variant chosen on one fold
scored on the other, pooled. Results are cached per variant in ``.cache/<set>/results/``, keyed
by the spec, its ``DHRParams`` and its version in ``variants.REGISTRY`` (``--fresh`` after a
change of the package's code). ``--crf`` (default) runs the package's final DenseCRF;
``--no-crf`` takes the argmax of the upsampled heat maps (screening only).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import numpy as np
import variants

from dhr_label.core.prototypes import Prototypes
from dhr_label.metrics.crossval import Tally, assign_folds, cross_validate, scores, sum_tallies
from dhr_label.presets import Preset
from dhr_label.runtime.parallel import map_chunks


@dataclass(frozen=True)
class Job:
    """What a worker needs: the set, the variants to run, their dataset-level state."""

    ds: common.DataSet
    specs: tuple[str, ...]
    crf: bool
    preset: Preset
    prototypes: Prototypes
    models: dict  # spec -> variants.prepare(...)


def images_of(job, image_id: str, files, specs) -> dict:
    """The image with Step 1 under each Step-1 setting the specs need (``common.step1_key``)."""
    out = {}
    for spec in specs:
        params = variants.parse(spec).params
        key = common.step1_key(params)
        if key not in out:
            out[key] = common.load_image(job.ds, image_id, files, job.preset, job.prototypes, params)
    return out


def work(job: Job, image_ids: list[str]) -> list[tuple[str, list]]:
    """A worker's chunk: every variant of ``job`` on each image, scored."""
    out = []
    cams, feats = job.ds.open()
    with cams, feats:
        for image_id in image_ids:
            images = images_of(job, image_id, (cams, feats), job.specs)
            rows = []
            for spec in job.specs:
                img = images[common.step1_key(variants.parse(spec).params)]
                t = time.perf_counter()
                mask = variants.mask_of(img, spec, job.crf, job.models.get(spec))
                seconds = time.perf_counter() - t
                rows.append((*img.score(mask), seconds))
            out.append((image_id, rows))
    return out


def result_path(ds: common.DataSet, spec: str, crf: bool) -> Path:
    parsed = variants.parse(spec)
    key = json.dumps([spec, crf, variants.REGISTRY[parsed.name][1], parsed.params.to_dict(), parsed.final], sort_keys=True)
    return ds.cache / "results" / f"{parsed.name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz"


def run(ds: common.DataSet, specs: list[str], crf: bool, workers: int, limit: int | None = None, fresh: bool = False):
    """Results per spec: dict(ids, confusion (n, C, C+1), eligible, vanished, seconds)."""
    ids = ds.ids()[:limit] if limit else ds.ids()
    preset = ds.preset()
    results, todo = {}, []
    for spec in dict.fromkeys(specs):
        path = result_path(ds, spec, crf)
        if path.exists() and not fresh and not limit:
            with np.load(path) as z:
                results[spec] = {k: z[k] for k in z.files}
        else:
            todo.append(spec)
    if todo:
        models = {spec: variants.prepare(ds, spec) for spec in todo}  # dataset-level state, once
        job = Job(ds, tuple(todo), crf, preset, common.prototypes(ds), models)
        chunks = [ids[i : i + 2] for i in range(0, len(ids), 2)]
        t0 = time.perf_counter()
        per_image = dict(item for part in map_chunks(partial(work, job), chunks, workers=workers) for item in part)
        print(f"# {len(todo)} variant(s) x {len(ids)} images in {time.perf_counter() - t0:.0f} s on {workers} worker(s)",
              file=sys.stderr)
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
    """A variant's per-image counts summed per fold, as ``tune`` sums them."""
    out = [Tally.empty(num_classes) for _ in range(k)]
    for n, image_id in enumerate(res["ids"].tolist()):
        one = Tally(res["confusion"][n], int(res["vanished"][n].sum()), int(res["eligible"][n].sum()), 1)
        out[folds[image_id]] = out[folds[image_id]].add(one)
    return out


def report(ids, preset, results: dict, specs: list[str], per_class: bool, objective: str = "miou") -> dict:
    """Print the table (and the cross-validation line for 2+ variants); return it as a dict."""
    folds = assign_folds(ids, 2, 0)
    specs = list(dict.fromkeys(specs))
    table = {spec: tallies(results[spec], folds, 2, preset.num_classes) for spec in specs}
    summary = {}
    width = max(30, *(len(s) for s in specs))
    head = f"{'variant':{width}s} {'mIoU':>6s} {'van':>4s} {'s/img':>6s}"
    print(head + ("  " + " ".join(f"{n[:5]:>5s}" for n in preset.classes) if per_class else ""))
    for spec in specs:
        s = scores(sum_tallies(table[spec], preset.num_classes))
        secs = float(results[spec]["seconds"].mean())
        summary[spec] = {"miou": s["miou"] * 100, "vanished": s["vanished"], "pairs": s["pairs"], "seconds": secs,
                         "iou": [None if v is None else v * 100 for v in s["iou"]]}
        line = f"{spec:{width}s} {s['miou'] * 100:6.2f} {s['vanished']:4d} {secs:6.3f}"
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
    parser.add_argument("--data-root", type=Path, default=None, help=f"where camvid-val and ccp-val are (default {common.SHARED})")
    parser.add_argument("--crf", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("-j", "--workers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="first N ids only (not cached)")
    parser.add_argument("--fresh", action="store_true", help="recompute cached results")
    parser.add_argument("--per-class", action="store_true")
    parser.add_argument("--objective", default="miou", choices=("miou", "vanished"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    ds = common.dataset(args.data, args.data_root)
    for spec in args.specs:
        variants.parse(spec)  # an unknown variant or field stops here, before any work
    ids, preset, results = run(ds, args.specs, args.crf, args.workers, args.limit, args.fresh)
    print(f"# {ds.name}: {len(ids)} images, final CRF {'on' if args.crf else 'off (argmax)'}")
    summary = report(ids, preset, results, args.specs, args.per_class, args.objective)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
