"""Prepare, on a machine with pydensecrf, everything the GPU check compares against.

The GPU machine has no pydensecrf (no wheel exists for it), so its references are made here,
into one folder that travels with the tree (``.gpu/``, git-ignored):

* ``data/``: the first ``--images`` images of a dhr-label directory (cams.h5, feats.h5, gt/,
  ids.txt; benchmarks/subset.py), the input of the end-to-end parts;
* ``calls.npz``: DHR's real DenseCRF calls on the first ``--calls`` of them (both passes,
  recorded from the numpy core with pydensecrf), channel values quantised to uint8
  (``p = q / 255`` in float32, dequantised with numpy on both machines);
* ``references.json``: per call, pydensecrf's argmax (in calls.npz) and the SHA-256 of the
  torch CRF's marginals computed here on the CPU (eager, one call at a time), which the GPU's
  eager and triton kernels must reproduce bit for bit; whether pydensecrf on the torch CRF's
  unary gives those same bytes;
* ``masks/pydensecrf``, ``masks/torch``: ``refine --device cpu`` masks of ``data/`` with each
  CRF backend (the end-to-end references);
* ``prepared.json``: what was made, how (commands, versions), sizes.

Usage::

    python benchmarks/gpu_prepare.py camvid-val .gpu            # ~5 min, ~25 MB
    python benchmarks/gpu_prepare.py DATA DIR --images 3 --calls 2 --crop 48x64 --crf-iters 3   # rehearsal
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from crf_agreement import camvid_records, pydensecrf_on_unary, torch_unary  # noqa: E402

from dhr_label.core.crf.meanfield import BatchCRF  # noqa: E402
from dhr_label.params import CRFParams, DHRParams  # noqa: E402

LIMIT_BYTES = 40 * 2**20  # what travels with a device call beside the tree (the call's limit is 64 MiB)


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def dequantise(q: np.ndarray) -> np.ndarray:
    """Channel values from their uint8 codes, the same bits on any machine (numpy float32)."""
    return q.astype(np.float32) / np.float32(255)


def marginals_sha(q: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(q, dtype=np.float32).tobytes()).hexdigest()


def record_calls(data: Path, count: int, params: DHRParams, crop: tuple[int, int] | None) -> list[dict]:
    """DHR's CRF calls on the first ``count`` images (pydensecrf, numpy core), quantised."""
    calls = []
    for record in camvid_records(data, count, params):
        image = record["image"]
        for k, probs in enumerate(record["calls"]):
            if crop is not None:  # a corner with both roads and buildings in CamVid-like scenes
                top, left = (image.shape[0] - crop[0]) // 2, (image.shape[1] - crop[1]) // 2
                image_c = np.ascontiguousarray(image[top : top + crop[0], left : left + crop[1]])
                probs = probs[:, top : top + crop[0], left : left + crop[1]]
            else:
                image_c = image
            q = np.clip(np.rint(probs * 255), 0, 255).astype(np.uint8)
            calls.append({"id": record["id"], "pass": k, "image": image_c, "codes": q})
    return calls


def references(calls: list[dict], params: CRFParams) -> list[dict]:
    """pydensecrf's argmax, and the torch CRF's marginals (hash), for every quantised call."""
    from dhr_label.core.crf.pydense import PydenseCRF  # pydensecrf: here, where the references are made

    out = []
    for i, call in enumerate(calls):
        probs = dequantise(call["codes"])
        ref = PydenseCRF(call["image"], params).marginals(probs)
        q = BatchCRF([torch.from_numpy(call["image"])], params, kernels="eager").marginals([torch.from_numpy(probs)])[0].numpy()
        same_unary = pydensecrf_on_unary(call["image"], torch_unary(probs, params), params)
        call["argmax"] = ref.argmax(axis=0).astype(np.uint8)
        out.append({"id": call["id"], "pass": call["pass"], "labels": int(probs.shape[0]), "size": list(probs.shape[1:]),
                    "torch_cpu_sha256": marginals_sha(q), "pydensecrf_same_unary_is_torch": bool(np.array_equal(q, same_unary)),
                    "torch_cpu_argmax_agreement": float((q.argmax(axis=0) == call["argmax"]).mean())})
        log(f"  call {i + 1}/{len(calls)} {call['id']} pass {call['pass']}: {probs.shape[0]} labels")
    return out


def refine_references(data: Path, out: Path, options: list[str]) -> dict:
    """``refine --device cpu`` with each CRF backend into ``out/masks/<backend>``."""
    made = {}
    for backend in ("pydensecrf", "torch"):
        target = out / "masks" / backend
        command = [sys.executable, "-m", "dhr_label", "refine", "--cams", str(data / "cams.h5"), "--feats", str(data / "feats.h5"),
                   "--out", str(target), "--device", "cpu", "--crf-backend", backend, "--workers", "2", "--overwrite", "--json",
                   *options]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"reference refine ({backend}) failed ({done.returncode}):\n{done.stderr[-3000:]}")
        made[backend] = {"command": ["python", *command[1:]], "seconds": time.perf_counter() - start,
                         "summary": json.loads(done.stdout)["counts"]}
        log(f"  masks with {backend}: {made[backend]['summary']}")
    return made


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="a dhr-label directory: cams.h5, feats.h5 (gt/ optional)")
    parser.add_argument("out", type=Path, help="the folder to fill (e.g. .gpu); emptied first")
    parser.add_argument("--images", type=int, default=16, help="images copied for the end-to-end parts")
    parser.add_argument("--calls", type=int, default=6, help="images whose two CRF calls are recorded")
    parser.add_argument("--crop", help="HxW: crop the recorded calls (rehearsals)")
    parser.add_argument("--crf-iters", type=int, default=CRFParams().iterations, help="CRF iterations of every reference")
    args = parser.parse_args(argv)
    for name in ("cams.h5", "feats.h5"):
        if not (args.data / name).is_file():
            parser.error(f"{args.data / name}: no such file")
    torch.set_num_threads(1)
    start = time.perf_counter()
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    params = DHRParams()
    params = params.replace(crf=dataclasses.replace(params.crf, iterations=args.crf_iters))
    options = ["--crf-iters", str(args.crf_iters)]
    log(f"subset: {args.images} images of {args.data}")
    subprocess.run([sys.executable, str(Path(__file__).with_name("subset.py")), str(args.data), str(args.out / "data"),
                    "--images", str(args.images)], check=True)
    crop = tuple(int(v) for v in args.crop.lower().split("x")) if args.crop else None
    log(f"CRF calls of {args.calls} images (pydensecrf, the numpy core)")
    calls = record_calls(args.out / "data", args.calls, params, crop)
    refs = references(calls, params.crf)
    arrays = {}
    for i, call in enumerate(calls):
        arrays[f"image_{i}"], arrays[f"codes_{i}"], arrays[f"argmax_{i}"] = call["image"], call["codes"], call["argmax"]
    np.savez_compressed(args.out / "calls.npz", **arrays)
    log("end-to-end references: refine --device cpu with pydensecrf and with the torch CRF")
    made = refine_references(args.out / "data", args.out, options)
    report = {
        "source": str(args.data), "images": args.images, "ids": (args.out / "data" / "ids.txt").read_text().split(),
        "crf_iterations": args.crf_iters, "refine_options": options, "crop": list(crop) if crop else None,
        "calls": refs, "masks": made, "python": platform.python_version(), "torch": torch.__version__,
        "numpy": np.__version__, "machine": platform.machine(), "seconds": time.perf_counter() - start,
    }
    (args.out / "references.json").write_text(json.dumps(refs, indent=1), encoding="utf-8")
    report["bytes"] = folder_bytes(args.out) + 4096
    (args.out / "prepared.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    exact = sum(r["pydensecrf_same_unary_is_torch"] for r in refs)
    log(f"{args.out}: {report['bytes'] / 2**20:.1f} MiB, {len(refs)} calls ({exact} bit-identical to pydensecrf on the "
        f"same unary), {report['seconds']:.0f} s")
    if report["bytes"] > LIMIT_BYTES:
        log(f"too large: {report['bytes'] / 2**20:.1f} MiB > {LIMIT_BYTES / 2**20:.0f} MiB; use fewer --images or --calls")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
