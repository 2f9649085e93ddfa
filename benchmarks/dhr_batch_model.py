"""The whole DHR batch on a device, counted on the CPU: what ``refine --device cuda`` asks of a GPU.

``benchmarks/gpu_model.py`` counts the DenseCRF alone; this runs every stage of DHR
(``core.stages.run_stages``: Step-1 OT, both upsamplings, both CRFs, integration, Steps 2-3,
the guard) on a batch of real images, as the batches executor does, inside
``device_meters.OpMeter``: the peak of live allocations (per pixel of the batch, the batch's
inputs added), the torch ops that would be kernel launches, and the host syncs, per batch and
per image. The CRF's mean-field runs one iteration (its state, and so the peak, is the same at
ten; the counts of the other nine are ``gpu_model.py``'s).

    python benchmarks/dhr_batch_model.py /path/to/camvid-val --images 4 --kernels triton --json dhr_batch.json

``--kernels triton`` runs the fused kernels under Triton's interpreter (set here).
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_meters import OpMeter  # noqa: E402

from dhr_label.core.pipeline import new_state, start  # noqa: E402
from dhr_label.core.stages import run_stages  # noqa: E402
from dhr_label.io.contract import CamsFile, FeatsFile  # noqa: E402
from dhr_label.io.inputs import load_inputs  # noqa: E402
from dhr_label.params import CRFBackend, DHRParams  # noqa: E402
from dhr_label.runtime.prototypes import PoolJob, pool  # noqa: E402


def measure(data: Path, count: int, kernels: str) -> dict:
    """Run DHR's stages on the first ``count`` images of ``data`` inside an OpMeter."""
    with CamsFile.open(data / "cams.h5") as cams, FeatsFile.open(data / "feats.h5") as feats:
        ids = cams.ids()[:count]
        inputs = [load_inputs(i, cams, feats, uss=True, wss=True) for i in ids]
        background, classes = cams.background, len(cams.classes)
    prototypes = pool(PoolJob(data / "cams.h5", data / "feats.h5", classes, wss=True), workers=1).prototypes
    defaults = DHRParams()
    params = defaults.replace(crf=dataclasses.replace(defaults.crf, backend=CRFBackend.torch, kernels=kernels, iterations=1))
    states = [start(new_state(i.cam, i.labels, i.image, i.base, i.uss, i.wss, background, prototypes), params) for i in inputs]
    input_bytes = sum(t.numel() * t.element_size() for s in states for t in [s.cam, s.image, s.base, s.uss, *s.wss] if t is not None)
    pixels = sum(s.image.shape[0] * s.image.shape[1] for s in states)
    t = time.perf_counter()
    with OpMeter() as meter:
        run_stages(states, params)
    return {"images": count, "pixels": pixels, "kernels": kernels, "seconds": time.perf_counter() - t,
            "peak_bytes_per_pixel": (meter.peak + input_bytes) / pixels, "inputs_bytes_per_pixel": input_bytes / pixels,
            "launches_per_image": meter.launches / count, "host_syncs_per_batch": meter.syncs,
            "top_ops": dict(meter.ops.most_common(8))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="a dhr-label directory (cams.h5, feats.h5), e.g. CamVid val")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--kernels", choices=["eager", "triton"], action="append", help="the CRF's kernels (repeatable; default both)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [measure(args.data, args.images, k) for k in (args.kernels or ["eager", "triton"])]
    for r in rows:
        print(f"{r['kernels']:7s} {r['images']} images: peak {r['peak_bytes_per_pixel']:.0f} B/pixel (inputs "
              f"{r['inputs_bytes_per_pixel']:.0f}), {r['launches_per_image']:.0f} launches/image at one CRF iteration, "
              f"{r['host_syncs_per_batch']} host syncs/batch ({r['seconds']:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
