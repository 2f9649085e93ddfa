"""``refine --crf-kernels triton`` against ``--crf-kernels eager`` end to end, on the CPU.

Runs ``dhr-label refine --device cpu --crf-backend torch`` twice on the first ``--images`` ids
of DATA: with the eager torch CRF, and with the fused Triton kernels under Triton's
interpreter (``TRITON_INTERPRET=1``, set here for that run: it is slow, a few minutes per
CamVid image), then compares the masks pixel by pixel (target >= 99.9 % per image; the
kernels are designed to give the same marginals bit for bit, so 100 % is expected).

Usage::

    python benchmarks/kernels_agreement.py camvid-val --images 3 --json kernels.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

TARGET = 0.999


def refine(data: Path, ids: Path, out: Path, kernels: str, extra: list[str]) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1" if kernels == "triton" else "0"}
    command = [sys.executable, "-m", "dhr_label", "refine", "--cams", str(data / "cams.h5"), "--feats", str(data / "feats.h5"),
               "--ids", str(ids), "--out", str(out), "--device", "cpu", "--crf-backend", "torch", "--crf-kernels", kernels,
               "--workers", "1", "--overwrite", "--json", *extra]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"refine --crf-kernels {kernels} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout)
    return {"command": " ".join(["dhr-label", *command[3:]]), "seconds": time.perf_counter() - start, "counts": summary["counts"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="a dhr-label directory (cams.h5, feats.h5)")
    parser.add_argument("--images", type=int, default=3, help="the first N ids of cams.h5")
    parser.add_argument("--out", type=Path, default=None, help="where the two mask folders go (default: a temporary one)")
    parser.add_argument("--json", type=Path)
    args, extra = parser.parse_known_args(argv)  # anything else goes to refine (e.g. --crf-iters 3)
    from dhr_label.io.contract import CamsFile

    with CamsFile.open(args.data / "cams.h5") as cams:
        ids = cams.ids()[: args.images]
    out = args.out or Path(tempfile.mkdtemp(prefix="dhr-kernels-"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "ids.txt").write_text("\n".join(ids) + "\n")
    runs = {k: refine(args.data, out / "ids.txt", out / k, k, extra) for k in ("eager", "triton")}
    per_image = []
    for image_id in ids:
        a = np.asarray(Image.open(out / "eager" / f"{image_id}.png"))
        b = np.asarray(Image.open(out / "triton" / f"{image_id}.png"))
        per_image.append({"id": image_id, "pixels": int(a.size), "same": int((a == b).sum())})
    total = sum(r["same"] for r in per_image) / sum(r["pixels"] for r in per_image)
    lowest = min(r["same"] / r["pixels"] for r in per_image)
    report = {"data": str(args.data), "images": len(ids), "runs": runs, "pixel_agreement": total, "lowest_image": lowest,
              "identical_images": sum(r["same"] == r["pixels"] for r in per_image), "per_image": per_image, "target": TARGET}
    for r in per_image:
        print(f"{r['id']:24s} {100 * r['same'] / r['pixels']:9.4f} %")
    print(f"pixel agreement {100 * total:.4f} % (lowest image {100 * lowest:.4f} %, {report['identical_images']} of "
          f"{len(ids)} identical); eager {runs['eager']['seconds']:.0f} s, triton (interpreted) {runs['triton']['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return 0 if lowest >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
