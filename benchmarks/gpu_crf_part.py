"""The ``crf`` part of the GPU check (benchmarks/gpu_parts.py): the torch CRF alone, on the device.

The prepared real CRF calls (benchmarks/gpu_prepare.py) with both kernels: argmax against
pydensecrf's (>= 99.9 % of every call's pixels), bytes against the CPU's torch CRF, triton
against eager, twice and in another batch (determinism); then CRF passes/s at 480x360 K=11 and
640x480 K=7, eager and fused, batch 1/16/64, with the lattice build's time and peak memory.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
from gpu_parts import Part, prepared, sha, sync

CALL_AGREEMENT = 0.999  # per CRF call, argmax against pydensecrf's
SPEED_SCALES = (("480x360", (360, 480), 11), ("640x480", (480, 640), 7))
REHEARSAL_SCALES = (("tiny-a", (24, 32), 11), ("tiny-b", (32, 40), 7))


def load_calls(args) -> tuple[list[dict], dict]:
    """The prepared CRF calls: image, dequantised channel values, pydensecrf argmax, CPU hash."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_prepare import dequantise

    info = prepared(args)
    arrays = np.load(args.prepared / "calls.npz")
    calls = []
    for i, ref in enumerate(info["calls"]):
        calls.append({**ref, "image": arrays[f"image_{i}"], "probs": dequantise(arrays[f"codes_{i}"]),
                      "argmax": arrays[f"argmax_{i}"]})
    return calls, info


def run_calls(calls: list[dict], kernels: str, device, iterations: int, order=None) -> dict:
    """Marginals of every call in one batch: per call, hash, argmax agreement with pydensecrf."""
    import torch

    from dhr_label.core.crf.meanfield import BatchCRF
    from dhr_label.params import CRFParams

    order = list(range(len(calls))) if order is None else order
    params = CRFParams(backend="torch", iterations=iterations)
    chosen = [calls[i] for i in order]
    crf = BatchCRF([torch.from_numpy(c["image"]).to(device) for c in chosen], params, kernels=kernels)
    qs = crf.marginals([torch.from_numpy(c["probs"]).to(device) for c in chosen])
    out = {}
    for i, c, q in zip(order, chosen, qs):
        agree = float((q.argmax(dim=0).cpu().numpy() == c["argmax"]).mean())
        out[i] = {"sha": sha(q), "agreement": agree}
    return out


def part_crf(part: Part) -> None:
    import torch

    args = part.args
    device = torch.device(args.device)
    calls, info = load_calls(args)
    iterations = info["crf_iterations"]
    results = {}

    def agreement(kernels):
        def go():
            results[kernels] = run_calls(calls, kernels, device, iterations)
            rows = results[kernels]
            return {"calls": len(rows), "min_agreement": min(r["agreement"] for r in rows.values()),
                    "mean_agreement": statistics.fmean(r["agreement"] for r in rows.values()),
                    "bit_identical_to_cpu_torch": sum(rows[i]["sha"] == calls[i]["torch_cpu_sha256"] for i in rows),
                    "per_call": [{"id": calls[i]["id"], "pass": calls[i]["pass"], "labels": calls[i]["labels"],
                                  "agreement": r["agreement"], "same_bytes_as_cpu": r["sha"] == calls[i]["torch_cpu_sha256"]}
                                 for i, r in rows.items()]}
        return go

    def agreeing(r):
        missed = []
        if r["min_agreement"] < CALL_AGREEMENT:
            missed.append(f"argmax = pydensecrf's on >= {CALL_AGREEMENT:.1%} of every call's pixels (lowest {r['min_agreement']:.4%})")
        if r["bit_identical_to_cpu_torch"] != r["calls"]:
            missed.append(f"the CPU torch CRF's marginals bit for bit ({r['bit_identical_to_cpu_torch']} of {r['calls']} calls)")
        return missed

    part.step("agreement_eager", agreement("eager"), needs=20, expect=agreeing)
    part.step("agreement_triton", agreement("triton"), needs=20, expect=agreeing)

    def determinism():
        first = results.get("triton")
        if first is None:
            raise RuntimeError("no triton run to compare with")
        again = run_calls(calls, "triton", device, iterations)
        shuffled = list(reversed(range(len(calls))))[: max(1, len(calls) // 2)]  # another batch: half, reversed
        other = run_calls(calls, "triton", device, iterations, order=shuffled)
        eager = results.get("eager", {})
        return {"same_bytes_twice": sum(again[i]["sha"] == first[i]["sha"] for i in first), "calls": len(first),
                "same_bytes_in_another_batch": sum(other[i]["sha"] == first[i]["sha"] for i in other), "another_batch": len(other),
                "triton_equals_eager": sum(eager[i]["sha"] == first[i]["sha"] for i in first if i in eager)}

    part.step("determinism_triton", determinism, needs=20, expect=lambda r: [] if (
        r["same_bytes_twice"] == r["calls"] and r["same_bytes_in_another_batch"] == r["another_batch"]
        and r["triton_equals_eager"] == r["calls"]) else ["the same bytes twice, in another batch, and as eager"])
    scales = REHEARSAL_SCALES if args.rehearse else SPEED_SCALES
    batches = (1, 2) if args.rehearse else (1, 16, 64)
    rows = []
    part.summary["speed"] = rows
    for kernels in ("triton", "eager"):
        for name, size, labels in scales:
            for batch in batches:
                part.step(f"speed_{kernels}_{name}_b{batch}",
                          lambda k=kernels, s=size, n=name, lab=labels, b=batch: rows.append(speed(args, k, n, s, lab, b, iterations))
                          or rows[-1], needs=15 if batch < 64 else 30)


def speed(args, kernels: str, name: str, size: tuple[int, int], labels: int, batch: int, iterations: int) -> dict:
    """One CRF configuration: lattice build and a CRF pass (``iterations``), median of 3, synced."""
    import torch
    import torch.nn.functional as F

    from dhr_label.core.crf.meanfield import BatchCRF
    from dhr_label.params import CRFParams

    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(batch)
    calls, _ = load_calls(args)
    images = []
    for b in range(batch):  # the prepared photos, resized, cycled
        photo = torch.from_numpy(calls[b % len(calls)]["image"]).permute(2, 0, 1)[None].float()
        images.append(F.interpolate(photo, size=size, mode="bilinear", align_corners=False)[0].round().clamp(0, 255)
                      .to(torch.uint8).permute(1, 2, 0).contiguous().to(device))
    grid = (max(2, size[0] // 16), max(2, size[1] // 16))
    probs = []
    for _ in range(batch):
        smooth = F.interpolate(torch.rand(1, labels, *grid, generator=gen), size=size, mode="bilinear", align_corners=False)[0]
        p = smooth**3 + 0.05 * torch.rand(labels, *size, generator=gen)
        probs.append((p / p.sum(dim=0, keepdim=True)).to(device))
    params = CRFParams(backend="torch", iterations=iterations)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    crf = BatchCRF(images, params, kernels=kernels)
    crf.marginals(probs)  # warm-up: compilation, allocator
    builds, passes = [], []
    for _ in range(1 if args.rehearse else 3):
        crf = None  # one batch's lattices at a time (the peak memory is one build's and one call's)
        sync(device)
        start = time.perf_counter()
        crf = BatchCRF(images, params, kernels=kernels)
        sync(device)
        built = time.perf_counter()
        crf.marginals(probs)
        sync(device)
        builds.append(built - start)
        passes.append(time.perf_counter() - built)
    t = statistics.median(passes)
    row = {"kernels": kernels, "scale": name, "labels": labels, "batch": batch, "iterations": iterations,
           "build_s": statistics.median(builds), "pass_s": t, "crf_passes_per_s": batch / t,
           "dhr_crf_images_per_s": batch / (2 * t + statistics.median(builds))}
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["peak_bytes_per_pixel"] = torch.cuda.max_memory_allocated(device) / (batch * size[0] * size[1])
    del crf
    return row
