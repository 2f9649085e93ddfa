"""Precision of the kept pixels against their coverage, for ``refine --ignore-below P``.

    python benchmarks/confidence.py /path/to/camvid-val [--workers 2] [--plot coverage.png] [--json out.json]
    python benchmarks/confidence.py /path/to/ccp-val --classes /path/to/ccp-val/classes.txt

DATA holds cams.h5, feats.h5 and gt/. Every image is refined once with the default parameters
(full DHR, or with ``--set name=value``); for each P, ``--ignore-below P`` keeps the pixels whose
final DenseCRF maximum marginal is >= P, and one exact confusion matrix per P counts the kept
labelled pixels: coverage = kept / labelled pixels, precision = right among kept / kept, and
the mIoU over the kept pixels only (as a trainer that skips 255 sees them). P = 0 is the mask
without --ignore-below.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

from dhr_label.cli.options import field_of, parse_value
from dhr_label.core.dhr import refine_image
from dhr_label.io.contract import CamsFile, FeatsFile
from dhr_label.io.inputs import load_inputs
from dhr_label.io.masks import read_mask
from dhr_label.metrics.confusion import confusion_matrix
from dhr_label.params import DHRParams
from dhr_label.plots import Series, render_chart
from dhr_label.presets import preset_from_classes, resolve_preset
from dhr_label.runtime.parallel import chunked, map_chunks
from dhr_label.runtime.prototypes import PoolJob, pool

LEVELS = (0.0, 0.5, 0.7, 0.9, 0.95, 0.99, 0.999, 0.9999)


def image_counts(data: Path, num_classes: int, background: int | None, params: DHRParams, prototypes, ids: list[str]) -> list[np.ndarray]:
    """Per image: one confusion matrix of the kept pixels per level."""
    out = []
    with CamsFile.open(data / "cams.h5") as cams, FeatsFile.open(data / "feats.h5") as feats:
        for image_id in ids:
            inputs = load_inputs(image_id, cams, feats, uss=True, wss=True)
            state = refine_image(inputs.cam, inputs.labels, image=inputs.image, base=inputs.base, uss=inputs.uss, wss=inputs.wss,
                                 background=background, params=params, prototypes=prototypes)
            gt = read_mask(data / "gt" / f"{image_id}.png")
            confidence = np.ones(gt.shape) if state.confidence is None else state.confidence  # one class: no CRF
            confusions = []
            for level in LEVELS:
                kept = np.where(confidence >= level, gt, 255).astype(gt.dtype)  # ignored pixels are not scored
                confusions.append(confusion_matrix(state.mask, kept, num_classes=num_classes, ignore_index=255))
            out.append(np.stack(confusions))
    return out


def miou(confusion: np.ndarray) -> float:
    """mIoU over the classes present in the GT, on the kept pixels (the last column: ignored)."""
    kept = confusion[:, :-1]
    tp = np.diag(kept).astype(float)
    union = kept.sum(0) + kept.sum(1) - tp
    present = confusion.sum(1) > 0
    return float(np.mean(tp[present] / np.maximum(union[present], 1)) * 100)


def _plot(path: Path, curves: list[tuple[str, list[dict]]]) -> None:
    """Precision against coverage, one line per (name, rows), the points at the levels P."""
    from PIL import Image

    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
    series = [Series(name, tuple((r["coverage"], r["precision"]) for r in rows), colour=colours[i % 4], line=True)
              for i, (name, rows) in enumerate(curves)]
    chart = render_chart(series, title="--ignore-below P, P = 0 ... 0.9999", x_label="coverage of the labelled pixels %",
                         y_label="precision of the kept pixels %")
    Image.fromarray(chart).save(path)


def _read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, nargs="?", help="omit to only draw --plot-with curves into --plot")
    parser.add_argument("--classes", default=None, help="preset or class-list file (default: the file's)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a parameter for every image")
    parser.add_argument("--plot", type=Path, default=None, help="write precision against coverage here (PNG)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot-with", type=Path, action="append", default=[], metavar="JSON",
                        help="also draw the curve of an earlier run's --json (another dataset)")
    args = parser.parse_args()
    if args.data is None:
        if not (args.plot and args.plot_with):
            parser.error("without DATA, give --plot and one or more --plot-with")
        _plot(args.plot, [(Path(d["data"]).name, d["rows"]) for d in map(_read_json, args.plot_with)])
        return 0
    with CamsFile.open(args.data / "cams.h5") as cams:
        ids = cams.ids()[: args.limit] if args.limit else cams.ids()
        preset = resolve_preset(args.classes) if args.classes else preset_from_classes(cams.classes, cams.background)
    c = len(preset.classes)
    start = time.perf_counter()
    confusion = np.zeros((len(LEVELS), c, c + 1), np.int64)
    params = DHRParams().with_values({field_of(k): parse_value(v) for k, v in (s.split("=", 1) for s in args.set)})
    prototypes = None
    if params.uses_prototypes:  # pooled from the base masks of every image, as refine does
        job = PoolJob(args.data / "cams.h5", args.data / "feats.h5", c, wss=params.steps.needs_wss)
        prototypes = pool(job, workers=args.workers).prototypes
    work = partial(image_counts, args.data, c, preset.background, params, prototypes)
    for result in map_chunks(work, chunked(ids, workers=args.workers, max_size=4), workers=args.workers):
        for item in result:
            confusion += item
    wall = time.perf_counter() - start
    labelled = confusion[0].sum()
    rows = []
    for index, level in enumerate(LEVELS):
        kept, right = confusion[index].sum(), np.trace(confusion[index][:, :c])
        rows.append({"P": level, "coverage": 100 * kept / labelled, "precision": 100 * right / max(kept, 1),
                     "miou_kept": miou(confusion[index])})
    print(f"# {len(ids)} images of {args.data}, {args.workers} workers, wall {wall:.1f} s", file=sys.stderr)
    print(f"# parameters: {json.dumps(params.to_dict())}", file=sys.stderr)
    print(f"{'P':>7} {'coverage %':>11} {'precision %':>12} {'mIoU kept':>10}")
    for row in rows:
        print(f"{row['P']:7.4f} {row['coverage']:11.2f} {row['precision']:12.2f} {row['miou_kept']:10.2f}")
    if args.plot:
        _plot(args.plot, [(args.data.name, rows)] + [(Path(d["data"]).name, d["rows"]) for d in map(_read_json, args.plot_with)])
    if args.json:
        args.json.write_text(json.dumps({"data": str(args.data), "images": len(ids), "wall_s": wall, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
