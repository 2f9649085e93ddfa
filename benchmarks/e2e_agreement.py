"""refine with one engine against refine with another, end to end: pixels and scores.

    python benchmarks/e2e_agreement.py /path/to/camvid-val --reference /tmp/cpu-masks \\
        --crf-backend torch --executor images --device cpu --out /tmp/torch-masks
    python benchmarks/e2e_agreement.py /path/to/camvid-val --reference /tmp/cpu-masks --device cuda

Runs ``refine`` on DATA (cams.h5, feats.h5, gt/) with the given CRF backend, executor (images:
the CPU workers; batches: the device executor, which ``--device cuda`` uses) and device, then
compares its masks with REFERENCE (a finished default run, e.g. ``dhr-label refine ... --out
REFERENCE``): the share of equal pixels per image and in total (target >= 99.5 %), and mIoU and
vanished pairs of both against gt/ (target: mIoU within 0.1).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dhr_label.metrics.report import summary
from dhr_label.params import CRFBackend, CRFParams, DHRParams
from dhr_label.presets import resolve_preset
from dhr_label.runtime.refine import RefineRequest, run_refine
from dhr_label.runtime.score import ground_truth, match, score_pairs


def scores(pred: Path, gt: Path, preset) -> dict:
    matching = match(ground_truth(gt), pred)
    run = score_pairs(matching.pairs, num_classes=preset.num_classes, workers=1)
    s = summary(run)
    return {"miou": 100 * s["miou"], "vanished": s["vanished"]["vanished"], "pairs": s["vanished"]["pairs"], "missing": len(matching.missing)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--reference", type=Path, required=True, help="masks of a default refine run on DATA")
    parser.add_argument("--out", type=Path, default=Path("/tmp/dhr-e2e"))
    parser.add_argument("--classes", default="camvid")
    parser.add_argument("--crf-backend", choices=[b.value for b in CRFBackend], default="torch")
    parser.add_argument("--executor", choices=["images", "batches"], default="batches")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-pixels", type=int, default=None, help="device batches' pixel budget (default: refine's)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    preset = resolve_preset(args.classes)
    params = DHRParams(crf=CRFParams(backend=CRFBackend(args.crf_backend)))
    request = RefineRequest(args.data / "cams.h5", args.data / "feats.h5", args.out, params, preset=preset,
                            overwrite=True, workers=args.workers, device=args.device, executor=args.executor,
                            **({"batch_pixels": args.batch_pixels} if args.batch_pixels else {}))
    start = time.perf_counter()
    report = run_refine(request)
    wall = time.perf_counter() - start
    if report.counts["failed"] or report.error:
        print(f"refine failed: {report.error or report.failures[:3]}", file=sys.stderr)
        return 1
    same = total = 0
    lowest = (2.0, "")
    for path in sorted(args.reference.glob("*.png")):
        a = np.asarray(Image.open(path))
        b = np.asarray(Image.open(args.out / path.name))
        equal = int((a == b).sum())
        same, total = same + equal, total + a.size
        lowest = min(lowest, (equal / a.size, path.stem))
    result = {
        "engine": {"crf_backend": args.crf_backend, "executor": args.executor, "device": args.device, "workers": args.workers},
        "images": report.counts["done"], "seconds": round(report.seconds, 1), "wall": round(wall, 1),
        "images_per_second": round(report.counts["done"] / report.seconds, 3),
        "pixel_agreement": same / total, "lowest_image": {"id": lowest[1], "agreement": lowest[0]},
        "this": scores(args.out, args.data / "gt", preset), "reference": scores(args.reference, args.data / "gt", preset),
    }
    result["miou_difference"] = result["this"]["miou"] - result["reference"]["miou"]
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
