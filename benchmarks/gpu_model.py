"""The device cost of the torch DenseCRF, measured on the CPU: eager torch ops against the fused
Triton kernels, per mean-field iteration, and what it predicts for an H100 / H200.

Counted by instrumentation while the CRF runs here on real CamVid photos (examples/camvid, or
``--data``) with smooth generated channel values:

* **launches**: eager, every dispatched torch op that is not a view (a ``TorchDispatchMode``;
  one op is one kernel on CUDA, the eager run uses CUDA's configuration: segment sums and int32
  indices); fused, every Triton launch (Triton's pre-run hooks), with the GPU's block sizes.
* **bytes**: eager, per op, the tensors it reads and writes (a gather reads the rows it
  gathers); fused, every element a kernel loads or stores (Triton's interpreter, its loads and
  stores wrapped). Both assume nothing stays in cache between or within kernels
  (``requested``); ``unique`` counts each 4-byte word once per launch (a perfect cache within a
  kernel), the floor of a kernel's DRAM traffic.
* **host syncs**: ops whose output size depends on data, ``.item()``, copies to the host.
* **peak memory**: live torch allocations (storages followed from the ops that create them to
  their release) from the lattice build to the marginals, over the batch's pixels; the inputs
  (photos, channel values) are not counted.

Prediction: an iteration takes ``bytes / bandwidth + launches x launch cost``; a CRF pass is
``iterations`` of them plus the per-call work (unary, slots, first softmax); DHR runs two passes
per image on one lattice build (the rest of DHR -- OT, upsampling, Steps 2-3 -- is not counted:
the DHR figure is the CRF's bound). Bandwidth: a device-to-device copy measured on the lent
machines (H100 80GB HBM3 3.0 TB/s, H200 4.3 TB/s, read + write counted); a gather of short rows
reaches less, so the predictions are upper bounds on speed. Launch cost: ``--launch-us``.

Usage::

    python benchmarks/gpu_model.py --batch 1 --json gpu_model.json   # ~20 min on a 2-vCPU VM
    python benchmarks/gpu_model.py --size 48x64 --batch 2 --quick     # the plumbing, in a minute or two
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported: CPU tensors
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from device_meters import OpMeter, triton_meter  # noqa: E402

from dhr_label.core.crf import fused, meanfield  # noqa: E402
from dhr_label.core.crf.meanfield import BatchCRF  # noqa: E402
from dhr_label.params import CRFParams  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "camvid"
DEVICES = {"H100": 3.0e12, "H200": 4.3e12}  # device-to-device copy, bytes/s (read + write)
SYNC_US = 20.0  # a blocking host round trip (a size read back, a copy to the host)
def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------
def photos(data: Path, count: int, size: tuple[int, int]) -> list[torch.Tensor]:
    """``count`` real photos of ``data`` resized to ``size`` (cycled, flipped on repeats)."""
    from dhr_label.io.contract import CamsFile

    out = []
    with CamsFile.open(data / "cams.h5") as cams:
        ids = cams.ids()
        for i in range(count):
            photo = torch.from_numpy(np.ascontiguousarray(cams.read_image(ids[i % len(ids)]))).permute(2, 0, 1)[None].float()
            if (i // len(ids)) % 2:
                photo = photo.flip(3)
            image = F.interpolate(photo, size=size, mode="bilinear", align_corners=False)[0]
            out.append(image.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous())
    return out


def channel_values(labels: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    """Smooth random fields on a stride-16 grid, upsampled, sharpened, plus noise (crf_speed.py)."""
    gen = torch.Generator().manual_seed(seed)
    grid = (max(2, size[0] // 16), max(2, size[1] // 16))
    smooth = F.interpolate(torch.rand(1, labels, *grid, generator=gen), size=size, mode="bilinear", align_corners=False)[0]
    probs = smooth**3 + 0.05 * torch.rand(labels, *size, generator=gen)
    return probs / probs.sum(dim=0, keepdim=True)


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def cuda_eager_configuration():
    """The eager path as it runs on CUDA: int32 lattice indices (segment sums are asked for
    with ``method="segments"``)."""
    original = meanfield.build_lattice
    meanfield.build_lattice = lambda *a, **k: original(*a, **{**k, "index_dtype": torch.int32})
    try:
        yield
    finally:
        meanfield.build_lattice = original


def measure_eager(images, probs, params: CRFParams) -> dict:
    """Build, per-iteration and per-call counts of the eager path; peak memory of build + call."""
    runs = {}
    with cuda_eager_configuration():
        for iterations in (1, 2):
            p = dataclasses.replace(params, iterations=iterations)
            with OpMeter() as build:
                crf = BatchCRF(images, p, kernels="eager", method="segments")
            with OpMeter() as call:
                q = crf.marginals(probs)
            runs[iterations] = (build, call, max(build.peak, build.current + call.peak))
            del crf, q
    build, one, peak = runs[1]
    two = runs[2][1]
    per_iteration = {k: two.figures()[k] - one.figures()[k] for k in ("launches", "bytes", "read", "written", "syncs")}
    per_iteration["ops"] = dict((Counter(two.ops) - Counter(one.ops)).most_common())
    per_call = {k: one.figures()[k] - per_iteration[k] for k in ("launches", "bytes", "syncs")}
    per_call["ops"] = dict((Counter(one.ops) - Counter(per_iteration["ops"])).most_common())
    return {"build": build.figures(), "iteration": per_iteration, "call": per_call, "peak_bytes": peak}


def measure_fused(images, probs, params: CRFParams) -> dict:
    """As :func:`measure_eager` for the fused kernels (one iteration run, attributed launch by
    launch); launches are counted with the GPU's block sizes (on a corner of the images)."""
    p = dataclasses.replace(params, iterations=1)
    with OpMeter() as build:
        crf = BatchCRF(images, p, kernels="triton")
    # Launches with the GPU's block sizes: the same on any crop (the tables grow with the
    # image, not the launches), so a 48 x 64 corner keeps the interpreter's many small
    # programs affordable.
    corners = [im[:48, :64].contiguous() for im in images]
    device = BatchCRF(corners, p, kernels="triton")
    device.fused = fused.FusedLattices(corners, p, tiling="device")
    with fused.count_launches() as counts:
        device.marginals([pr[:, :48, :64].contiguous() for pr in probs])
    del device
    figures = {"build": build.figures(), "launches_per_iteration": sum(counts.values()) - 1,
               "launches_by_kernel": counts}
    with OpMeter() as call, triton_meter() as kernels:
        q = crf.marginals(probs)
    first, rest = kernels[0], kernels[1:]  # the first softmax, then the one iteration
    iteration = {"launches": figures["launches_per_iteration"], "bytes": sum(k["requested"] for k in rest),
                 "unique_bytes": sum(k["unique"] for k in rest), "syncs": 0,
                 "by_kernel": {name: {"requested": sum(k["requested"] for k in rest if k["kernel"] == name),
                                      "unique": sum(k["unique"] for k in rest if k["kernel"] == name)}
                               for name in ("splat_kernel", "blur_kernel", "update_kernel")}}
    calls = call.figures()
    per_call = {"launches": calls["launches"] + 1, "bytes": calls["bytes"] + first["requested"], "syncs": calls["syncs"],
                "ops": calls["ops"]}
    del q
    return {**figures, "iteration": iteration, "call": per_call, "peak_bytes": max(build.peak, build.current + call.peak),
            "lattice_points": crf.fused.lattice_points, "structures": crf.fused.structures}


def lattice_builds(name: str, batch: int, pixels_per_image: int) -> int:
    """Lattices built for a batch of ``batch`` same-size images: eager, one Gaussian and one
    bilateral over the batch; fused, one Gaussian per size and a bilateral per chunk."""
    if name == "eager":
        return 2
    return 1 + -(-batch * pixels_per_image // fused.CHUNK_PIXELS)


def predict(name: str, m: dict, pixels_per_image: int, images: int, iterations: int, launch_us: float) -> dict:
    """passes/s at batch 1, 16, 64 and DHR images/s (two passes, one build) per device."""
    it, call, build = m["iteration"], m["call"], m["build"]
    pixels_measured = pixels_per_image * images
    builds_measured = lattice_builds(name, images, pixels_per_image)
    out = {}
    for device, bandwidth in DEVICES.items():
        row = {}
        for batch in (1, 16, 64):
            pixels = batch * pixels_per_image
            t_iter = pixels * it["bytes"] / pixels_measured / bandwidth + it["launches"] * launch_us * 1e-6
            t_call = (pixels * call["bytes"] / pixels_measured / bandwidth
                      + (call["launches"] * launch_us + call["syncs"] * SYNC_US) * 1e-6 * batch / images)
            # The build's ops and syncs come per lattice built; its bytes per pixel.
            per_build = (build["launches"] * launch_us + build["syncs"] * SYNC_US) * 1e-6 / builds_measured
            t_build = pixels * build["bytes"] / pixels_measured / bandwidth + per_build * lattice_builds(name, batch, pixels_per_image)
            t_pass = iterations * t_iter + t_call
            row[f"batch_{batch}"] = {"iteration_ms": 1e3 * t_iter, "pass_ms": 1e3 * t_pass, "build_ms": 1e3 * t_build,
                                     "crf_passes_per_s": batch / t_pass, "dhr_images_per_s": batch / (2 * t_pass + t_build)}
        out[device] = row
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=EXAMPLE, help="a dhr-label directory whose photos are used (default: examples/camvid)")
    parser.add_argument("--size", default="360x480", help="H x W of the images (default: CamVid's 360x480)")
    parser.add_argument("--labels", type=int, default=11)
    parser.add_argument("--batch", type=int, default=1, help="images measured together (per-pixel figures)")
    parser.add_argument("--memory-batch", type=int, default=8, help="images of the peak-memory measurement (several bilateral chunks)")
    parser.add_argument("--launch-us", type=float, default=5.0, help="cost of one kernel launch, microseconds")
    parser.add_argument("--quick", action="store_true", help="skip the peak-memory batch (plumbing checks)")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    h, w = (int(v) for v in args.size.lower().split("x"))
    params = CRFParams(backend="torch")
    start = time.perf_counter()
    images = photos(args.data, args.batch, (h, w))
    probs = [channel_values(args.labels, (h, w), seed=i) for i in range(args.batch)]
    log(f"eager: {args.batch} x {h}x{w}, K={args.labels}")
    eager = measure_eager(images, probs, params)
    log(f"fused: the same (Triton's interpreter; {time.perf_counter() - start:.0f} s so far)")
    fused_figures = measure_fused(images, probs, params)
    pixels = h * w
    report = {
        "size": [h, w], "labels": args.labels, "images": args.batch, "iterations": params.iterations,
        "launch_us": args.launch_us, "sync_us": SYNC_US, "bandwidth_bytes_per_s": DEVICES,
        "eager": eager, "fused": fused_figures,
    }
    for name, m in (("eager", eager), ("fused", fused_figures)):
        m["iteration_bytes_per_pixel"] = m["iteration"]["bytes"] / (pixels * args.batch)
        m["peak_bytes_per_pixel_measured_batch"] = m.pop("peak_bytes") / (pixels * args.batch)
        m["prediction"] = predict(name, m, pixels, args.batch, params.iterations, args.launch_us)
    fused_figures["iteration_unique_bytes_per_pixel"] = fused_figures["iteration"]["unique_bytes"] / (pixels * args.batch)
    if not args.quick:
        log(f"peak memory: {args.memory_batch} images ({time.perf_counter() - start:.0f} s so far)")
        report["memory"] = peak_memory(args.data, args.memory_batch, (h, w), args.labels, params)
    report["seconds"] = time.perf_counter() - start
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return 0


def peak_memory(data: Path, count: int, size: tuple[int, int], labels: int, params: CRFParams) -> dict:
    """Peak live bytes per pixel of build + one call (1 iteration: the state is the same at 10),
    for a batch of ``count`` images; the fused path with one bilateral lattice chunk per image."""
    images = photos(data, count, size)
    probs = [channel_values(labels, size, seed=50 + i) for i in range(count)]
    p = dataclasses.replace(params, iterations=1)
    out = {"images": count}
    with cuda_eager_configuration(), OpMeter() as meter:
        q = BatchCRF(images, p, kernels="eager", method="segments").marginals(probs)
    out["eager_bytes_per_pixel"] = meter.peak / (count * size[0] * size[1])
    del q
    # One image per bilateral build: its temporaries over `count` images, as a batch of
    # count x (images per CHUNK_PIXELS) images would have them.
    chunk, default = size[0] * size[1], fused.CHUNK_PIXELS
    fused.CHUNK_PIXELS = chunk
    try:
        with OpMeter() as meter:
            BatchCRF(images, p, kernels="triton").marginals(probs)
    finally:
        fused.CHUNK_PIXELS = default
    out["fused_bytes_per_pixel"] = meter.peak / (count * size[0] * size[1])
    out["fused_chunk_pixels"] = chunk
    out["equivalent_batch_at_default_chunk"] = count * max(1, default // chunk)
    return out


def print_report(r: dict) -> None:
    h, w = r["size"]
    print(f"== device cost per mean-field iteration, {h}x{w}, K={r['labels']} ({r['images']} real photos), counted on the CPU")
    print(f"{'path':6s} {'launches':>9s} {'kB/pixel':>9s} {'unique':>8s} {'syncs/call':>10s} {'peak B/px':>10s}")
    for name in ("eager", "fused"):
        m = r[name]
        unique = m.get("iteration_unique_bytes_per_pixel")
        print(f"{name:6s} {m['iteration']['launches']:9d} {m['iteration_bytes_per_pixel'] / 1e3:9.2f} "
              f"{(unique / 1e3 if unique else float('nan')):8.2f} {m['call']['syncs']:10d} {m['peak_bytes_per_pixel_measured_batch']:10.0f}")
    if "memory" in r:
        mem = r["memory"]
        print(f"peak memory, batch of {mem['images']}: eager {mem['eager_bytes_per_pixel']:.0f} B/pixel, "
              f"fused {mem['fused_bytes_per_pixel']:.0f} B/pixel")
    print(f"predicted (copy bandwidth, {r['launch_us']} us a launch): CRF passes/s | DHR images/s (CRF only)")
    for name in ("eager", "fused"):
        for device, rows in r[name]["prediction"].items():
            cells = "  ".join(f"B={b.split('_')[1]:>2s} {v['crf_passes_per_s']:7.0f} | {v['dhr_images_per_s']:5.0f}" for b, v in rows.items())
            print(f"{name:6s} {device}: {cells}")


if __name__ == "__main__":
    sys.exit(main())
