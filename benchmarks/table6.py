"""The paper's Table 6 on a real benchmark: the seven ablation rows of DHR, scored against GT.

    python benchmarks/table6.py /path/to/camvid-val [--workers 2] [--limit N] [--set tau=0.5]
    python benchmarks/table6.py /path/to/ccp-val --classes /path/to/ccp-val/classes.txt

DATA holds cams.h5, feats.h5 and gt/. Prints, per row: mIoU, the vanished (image, class) pairs
(the class covering >= 0.1 % of the image's labelled GT pixels, per-image IoU < 0.1; as
``dhr-label score`` counts them) and the per-class IoU. The rows run through ``dhr-label
tune``'s engine, so Step 1 is computed once per image for the rows that share it (4-7) and every
row is scored exactly; ``--set name=value`` changes any parameter for every row (a refine option
name or a dotted DHRParams field).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from dhr_label.cli.options import field_of, parse_value
from dhr_label.params import DHRParams, Steps
from dhr_label.presets import resolve_preset
from dhr_label.runtime.tune import TuneRequest, run_tune

ROWS = (1, 2, 3, 4, 5, 6, 7)
NAMES = {1: "base mask", 2: "OT, no CRF", 3: "CRF, no OT", 4: "Step 1 (OT + CRF)", 5: "+ USS only", 6: "+ WSS only", 7: "full DHR"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="a benchmark folder with cams.h5, feats.h5, gt/")
    parser.add_argument("--classes", default=None, help="preset or class-list file (default: the file's)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="only the first N ids")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--out", type=Path, default=None, help="keep tune's per-image counts here (resumable)")
    args = parser.parse_args()
    base = DHRParams().with_values({field_of(k): parse_value(v) for k, v in (s.split("=", 1) for s in args.set)})
    variants = tuple(base.replace(steps=Steps.row(row)) for row in ROWS)
    work = args.out or Path(tempfile.mkdtemp(prefix="table6-"))
    ids_file = None
    if args.limit:
        from dhr_label.io.contract import CamsFile

        with CamsFile.open(args.data / "cams.h5") as cams:
            ids_file = work / "ids.txt"
            work.mkdir(parents=True, exist_ok=True)
            ids_file.write_text("\n".join(cams.ids()[: args.limit]) + "\n")
    preset = resolve_preset(args.classes) if args.classes else None
    request = TuneRequest(args.data / "cams.h5", args.data / "feats.h5", args.data / "gt", work, variants,
                          tuple({"row": row} for row in ROWS), preset, ids_file=ids_file, workers=args.workers)
    start = time.perf_counter()
    report = run_tune(request)
    wall = time.perf_counter() - start
    print(f"# {report.images} images of {args.data}, {args.workers} workers, wall {wall:.1f} s", file=sys.stderr)
    print(f"# parameters: {json.dumps(base.to_dict())}", file=sys.stderr)
    classes = report.preset.classes
    print(f"{'row':>3} {'what':<18} {'mIoU':>6} {'vanished':>11}  " + " ".join(f"{c[:6]:>6}" for c in classes))
    rows = {}
    for row, score in zip(ROWS, report.totals):
        ious = " ".join("     -" if v is None else f"{100 * v:6.1f}" for v in score["iou"])
        print(f"{row:>3} {NAMES[row]:<18} {100 * score['miou']:6.2f} {score['vanished']:>5}/{score['pairs']:<5}  {ious}")
        rows[row] = {"miou": 100 * score["miou"], "vanished": score["vanished"], "pairs": score["pairs"],
                     "iou": [None if v is None else 100 * v for v in score["iou"]]}
    if args.json:
        args.json.write_text(json.dumps({"params": base.to_dict(), "images": report.images, "classes": list(classes),
                                         "rows": rows, "wall_seconds": wall}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
