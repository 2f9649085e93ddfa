"""Speed of the torch DenseCRF: against pydensecrf on one CPU thread, and on CUDA when present.

1. CPU, one thread each (``torch.set_num_threads(1)``; pydensecrf is single-threaded): per
   image at CamVid scale (360 x 480, 11 labels) and COCO scale (480 x 640, 7 labels), 10
   mean-field iterations, the lattice set-up (pydensecrf: ``DenseCRF2D`` + both
   ``addPairwise*``, which build the lattices and their normalisation; torch: ``BatchCRF``)
   timed apart from inference (pydensecrf: ``setUnaryEnergy`` + ``inference``; torch:
   ``marginals``, unary included). The two are timed image by image, alternately, so the
   load of a shared machine hits both alike; medians and their ratios are printed.
2. CUDA (when available): the CRF alone, 480 x 360 with 11 labels and 640 x 480 with 7, for a
   few batch sizes: lattice build and inference per batch (warm-up first, synchronised),
   images per second, peak GPU memory, and inference as a fraction of a memory-traffic bound.
   The bound counts the bytes an ideal fused implementation must move per mean-field
   iteration on the lattices actually built (float32 values, int32 indices), per kernel:
   splat ``P L`` values in, ``E = P (d+1)`` entry indices and weights, ``M L`` rows out;
   blur, per direction, each row, its two neighbours and their indices, the row out; slice
   ``E L`` vertex rows, ``E`` indices and weights, ``P L`` out; softmax: unary, two messages
   in, Q out (``S`` = label slots). Divided by the device-to-device copy bandwidth measured
   here (``Tensor.copy_``, read + write counted), it gives the fastest an iteration could be.

Images: the CamVid photos of ``--data`` resized to each size (random smooth colour fields
without it); channel values: smooth random fields on a stride-16 grid, upsampled, sharpened,
plus noise (as ``crf_agreement.py``).

Usage::

    python benchmarks/crf_speed.py --data camvid-val --images 3 --json speed.json
    python benchmarks/crf_speed.py --images 2 --skip-cuda          # a few minutes on a small CPU
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dhr_label.core.crf.meanfield import BatchCRF
from dhr_label.params import CRFParams

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402, I001  (the machine facts, one place)

CPU_SCALES = (("CamVid", 360, 480, 11), ("COCO", 480, 640, 7))
CUDA_SCALES = (("480x360", 360, 480, 11), ("640x480", 480, 640, 7))


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def machine() -> dict:
    """speed.py's machine facts, plus the CUDA device and runtime."""
    import torch

    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {**speed.machine(), "cuda_device": cuda, "cuda_runtime": torch.version.cuda, "load_average": os.getloadavg()}


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------
def photos(data: Path | None, count: int, size: tuple[int, int], gen: torch.Generator) -> list[np.ndarray]:
    """``count`` H x W x 3 uint8 images: CamVid photos resized, or smooth random colours."""
    images = []
    if data is not None:
        from dhr_label.io.contract import CamsFile

        with CamsFile.open(data / "cams.h5") as cams:
            ids = cams.ids()
            for i in range(count):
                photo = torch.from_numpy(cams.read_image(ids[(5 * i) % len(ids)])).permute(2, 0, 1)[None].float()
                images.append(F.interpolate(photo, size=size, mode="bilinear", align_corners=False)[0])
    else:
        for _ in range(count):
            low = torch.rand(1, 3, size[0] // 24, size[1] // 24, generator=gen) * 255
            images.append(F.interpolate(low, size=size, mode="bilinear", align_corners=False)[0] + torch.randn(3, *size, generator=gen) * 4)
    return [im.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy() for im in images]


def channel_values(labels: int, size: tuple[int, int], gen: torch.Generator) -> np.ndarray:
    grid = (max(2, size[0] // 16), max(2, size[1] // 16))
    smooth = F.interpolate(torch.rand(1, labels, *grid, generator=gen), size=size, mode="bilinear", align_corners=False)[0]
    probs = smooth**3 + 0.05 * torch.rand(labels, *size, generator=gen)
    return (probs / probs.sum(dim=0, keepdim=True)).numpy().astype(np.float32)


# ----------------------------------------------------------------------------------------------
# 1. CPU, one thread
# ----------------------------------------------------------------------------------------------
def time_pydensecrf(image: np.ndarray, probs: np.ndarray, params: CRFParams) -> tuple[float, float]:
    import pydensecrf.densecrf as dcrf  # here: a CUDA machine without pydensecrf runs the rest

    c, h, w = probs.shape
    unary = np.ascontiguousarray(-np.log(np.maximum(probs, params.unary_clip)).reshape(c, -1), dtype=np.float32)
    start = time.perf_counter()
    model = dcrf.DenseCRF2D(w, h, c)
    model.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
    model.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb, rgbim=image, compat=params.bilateral_compat)
    built = time.perf_counter()
    model.setUnaryEnergy(unary)
    np.asarray(model.inference(params.iterations))
    return built - start, time.perf_counter() - built


def time_torch(images: list, probs: list, params: CRFParams, device: torch.device) -> tuple[float, float, BatchCRF]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    crf = BatchCRF(images, params, device=device)
    sync()
    built = time.perf_counter()
    crf.marginals(probs)
    sync()
    return built - start, time.perf_counter() - built, crf


def cpu_comparison(data: Path | None, count: int, params: CRFParams) -> list[dict]:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, h, w, labels in CPU_SCALES:
        images = photos(data, count, (h, w), gen)
        py_build, py_inf, th_build, th_inf = [], [], [], []
        warm = torch.from_numpy(images[0])
        time_torch([warm], [torch.from_numpy(channel_values(labels, (h, w), gen))], params, torch.device("cpu"))  # warm-up
        for i, image in enumerate(images):
            probs = channel_values(labels, (h, w), gen)
            b, t = time_pydensecrf(image, probs, params)
            py_build.append(b)
            py_inf.append(t)
            b, t, _ = time_torch([torch.from_numpy(image)], [torch.from_numpy(probs)], params, torch.device("cpu"))
            th_build.append(b)
            th_inf.append(t)
            log(f"  cpu {name} image {i + 1}/{count}: pydensecrf {py_build[-1]:.2f} + {py_inf[-1]:.2f} s, torch {th_build[-1]:.2f} + {th_inf[-1]:.2f} s")
        med = statistics.median
        row = {
            "scale": name, "size": [h, w], "labels": labels, "images": count,
            "pydensecrf_build_s": med(py_build), "pydensecrf_inference_s": med(py_inf),
            "torch_build_s": med(th_build), "torch_inference_s": med(th_inf),
        }
        row["pydensecrf_total_s"] = row["pydensecrf_build_s"] + row["pydensecrf_inference_s"]
        row["torch_total_s"] = row["torch_build_s"] + row["torch_inference_s"]
        for part in ("build", "inference", "total"):
            row[f"ratio_{part}"] = row[f"torch_{part}_s"] / row[f"pydensecrf_{part}_s"]
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# 2. CUDA
# ----------------------------------------------------------------------------------------------
def copy_bandwidth(device: torch.device, mib: int = 1024) -> float:
    """Device-to-device copy bandwidth, bytes/s, read + write counted."""
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    repeats = 10
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    return 2 * src.numel() * 4 * repeats / (time.perf_counter() - start)


def iteration_bytes(crf: BatchCRF, slots: int) -> int:
    """Bytes an ideal fused mean-field iteration moves on ``crf``'s lattices (module doc)."""
    total = 0
    for lat in crf.lattices:
        p, m, k, l = lat.n_pixels, lat.n_points, lat.d + 1, slots
        e = p * k
        splat = p * l * 4 + e * 8 + m * l * 4
        blur = k * (4 * m * l * 4 + 2 * m * 4)
        slice_ = e * l * 4 + e * 8 + p * l * 4
        total += splat + blur + slice_
    return total + 4 * crf.n_pixels * slots * 4


def cuda_throughput(data: Path | None, batch_sizes: list[int], params: CRFParams, repeats: int) -> dict:
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    gen = torch.Generator().manual_seed(1)
    rows = []
    for name, h, w, labels in CUDA_SCALES:
        pool = photos(data, max(batch_sizes), (h, w), gen)
        values = [channel_values(labels, (h, w), gen) for _ in range(max(batch_sizes))]
        for batch in batch_sizes:
            images = [torch.from_numpy(im).to(device) for im in pool[:batch]]
            probs = [torch.from_numpy(v).to(device) for v in values[:batch]]
            time_torch(images, probs, params, device)  # warm-up: kernels, allocator
            torch.cuda.reset_peak_memory_stats(device)
            builds, infs = [], []
            for _ in range(repeats):
                b, t, crf = time_torch(images, probs, params, device)
                builds.append(b)
                infs.append(t)
            inf = statistics.median(infs)
            slots = labels  # one label count per batch: the slots are the labels
            bound = iteration_bytes(crf, slots) / bandwidth
            row = {
                "scale": name, "labels": labels, "batch": batch, "build_s": statistics.median(builds), "inference_s": inf,
                "images_per_s": batch / inf, "images_per_s_with_build": batch / (inf + statistics.median(builds)),
                "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "lattice_points": [lat.n_points for lat in crf.lattices],
                "bytes_per_iteration": iteration_bytes(crf, slots),
                "bound_iteration_s": bound, "iteration_s": inf / params.iterations,
            }
            row["fraction_of_bound"] = bound / row["iteration_s"]
            rows.append(row)
            log(f"  cuda {name} batch {batch}: {row['images_per_s']:.1f} img/s")
    return {"device": torch.cuda.get_device_name(device), "copy_bandwidth_gbs": bandwidth / 1e9, "rows": rows}


# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None,
                        help="a dhr-label directory whose photos are used (e.g. camvid-val; default: generated images)")
    parser.add_argument("--images", type=int, default=3, help="images per scale for the CPU comparison")
    parser.add_argument("--batch-sizes", default="1,4,16", help="CUDA batch sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="timed CUDA runs per batch size (median)")
    parser.add_argument("--skip-cpu", action="store_true", help="no CPU comparison")
    parser.add_argument("--skip-cuda", action="store_true", help="no CUDA figures even with a GPU")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    params = CRFParams()
    report = {"machine": machine(), "iterations": params.iterations}
    print("machine:", json.dumps(report["machine"]))

    if not args.skip_cpu:
        report["cpu"] = cpu_comparison(args.data, args.images, params)
        print(f"\n== CPU, one thread, median per image ({args.images} images per scale), {params.iterations} iterations")
        print(f"{'scale':8s} {'size':>9s} {'K':>3s} | {'pydensecrf build':>16s} {'infer':>7s} | {'torch build':>11s} {'infer':>7s} | "
              f"{'ratio build':>11s} {'infer':>6s} {'total':>6s}")
        for r in report["cpu"]:
            print(f"{r['scale']:8s} {r['size'][0]:4d}x{r['size'][1]:<4d} {r['labels']:3d} | {r['pydensecrf_build_s']:15.3f}s {r['pydensecrf_inference_s']:6.3f}s | "
                  f"{r['torch_build_s']:10.3f}s {r['torch_inference_s']:6.3f}s | {r['ratio_build']:11.2f} {r['ratio_inference']:6.2f} {r['ratio_total']:6.2f}")
        print("ratio = torch / pydensecrf (below 1: torch faster)")

    if args.skip_cuda or not torch.cuda.is_available():
        print("\n== CUDA: " + ("skipped" if args.skip_cuda else "no CUDA device on this machine, not measured"))
    else:
        sizes = [int(s) for s in args.batch_sizes.split(",") if s]
        report["cuda"] = cuda_throughput(args.data, sizes, params, args.repeats)
        c = report["cuda"]
        print(f"\n== CUDA {c['device']}: device-to-device copy {c['copy_bandwidth_gbs']:.0f} GB/s, {params.iterations} iterations")
        print(f"{'scale':8s} {'K':>3s} {'batch':>5s} | {'build':>8s} {'infer':>8s} | {'img/s':>8s} {'w/ build':>8s} | {'peak GiB':>8s} | "
              f"{'iter':>8s} {'bound':>8s} {'of bound':>8s}")
        for r in c["rows"]:
            print(f"{r['scale']:8s} {r['labels']:3d} {r['batch']:5d} | {r['build_s'] * 1e3:6.1f}ms {r['inference_s'] * 1e3:6.1f}ms | "
                  f"{r['images_per_s']:8.1f} {r['images_per_s_with_build']:8.1f} | {r['peak_memory_gib']:8.2f} | "
                  f"{r['iteration_s'] * 1e3:6.2f}ms {r['bound_iteration_s'] * 1e3:6.3f}ms {100 * r['fraction_of_bound']:7.1f}%")
    report["machine"]["load_average_after"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
