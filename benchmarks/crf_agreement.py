"""Contract check: the torch DenseCRF against pydensecrf on DHR's real unaries.

1. CamVid val (or any dhr-label v1 directory with ``cams.h5`` and ``feats.h5``): every image
   is refined by the stages (``dhr_label.core.stages.run_stages``, default parameters, a batch of
   one as a CPU worker runs it) with a recording pydensecrf CRF, which keeps the channel values of
   both DHR passes exactly as they reach the CRF (pass 1: the upsampled seed scores; pass 2: the
   upsampled heat maps).
   The recorded calls are then replayed through the torch CRF, several images per batch (mixed
   label counts, as a batched run has them), and compared with pydensecrf's marginals.
2. Generated VOC / COCO-scale scenes (333 x 500 and 427 x 640): the CamVid photos bilinearly
   resized to those sizes (natural images), with 2-21 label channels made like CAMs: smooth
   random fields on a stride-16 grid, bilinearly upsampled, sharpened (power 3), plus 5 %
   uniform noise, normalised per pixel.

Per image and in total: the share of pixels with the same argmax (target >= 99.5 %), the max
and mean absolute difference of the marginals. ``exact`` counts the CRF calls whose marginals
are bit-identical to pydensecrf run on the torch CRF's own unary (``-log`` in float64 rounded
to float32; the wrapper's numpy float32 ``log`` differs from it in the last bit for ~20 % of
values, which is why the end-to-end figures are not all 0).

Usage::

    python benchmarks/crf_agreement.py camvid-val --images 101 --generated 6 --json agreement.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dhr_label.core.crf.meanfield import BatchCRF
from dhr_label.core.pipeline import new_state
from dhr_label.core.pipeline import start as start_stages
from dhr_label.core.stages import CRFCache, run_stages
from dhr_label.io.contract import CamsFile, FeatsFile
from dhr_label.io.inputs import load_inputs
from dhr_label.params import CRFParams, DHRParams

TARGET = 0.995


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


class RecordingCRF(CRFCache):
    """pydensecrf for one image (the wrapper), recording the channel values of every call: the
    CRFs the scheduler gets for the image (``ImageCRFs`` of a batch of one)."""

    def __init__(self, image: np.ndarray, params: CRFParams):
        super().__init__(params)
        from dhr_label.core.crf.pydense import PydenseCRF  # pydensecrf, imported where it is used

        self._crf = PydenseCRF(image, params)
        self.calls: list[np.ndarray] = []
        self.outputs: list[np.ndarray] = []

    def get(self, images):
        return self

    def marginals(self, probs: list) -> list:
        (p,) = probs
        self.calls.append(p.numpy().astype(np.float32))
        q = self._crf.marginals(self.calls[-1])
        self.outputs.append(q)
        return [torch.from_numpy(q)]


def pydensecrf_on_unary(image: np.ndarray, unary: np.ndarray, params: CRFParams) -> np.ndarray:
    """pydensecrf's marginals for a given unary (C x H x W float32)."""
    import pydensecrf.densecrf as dcrf

    c, h, w = unary.shape
    model = dcrf.DenseCRF2D(w, h, c)
    model.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
    model.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb, rgbim=image, compat=params.bilateral_compat)
    model.setUnaryEnergy(np.ascontiguousarray(unary.reshape(c, -1)))
    return np.asarray(model.inference(params.iterations), dtype=np.float32).reshape(c, h, w)


def torch_unary(probs: np.ndarray, params: CRFParams) -> np.ndarray:
    """The torch CRF's unary: float32 clip, ``log`` in float64 rounded once (as meanfield)."""
    clipped = torch.clamp_min(torch.from_numpy(probs), float(np.float32(params.unary_clip)))
    return (-torch.log(clipped.double())).float().numpy()


def compare(q: np.ndarray, ref: np.ndarray) -> dict:
    diff = np.abs(q - ref)
    same = int((q.argmax(axis=0) == ref.argmax(axis=0)).sum())
    return {"pixels": int(q[0].size), "same": same, "max_abs": float(diff.max()), "sum_abs": float(diff.sum()), "values": int(q.size)}


def replay(records: list[dict], params: CRFParams, device: torch.device, batch: int, check_exact: bool) -> None:
    """Run the torch CRF on the recorded calls, ``batch`` images at a time; fill in the figures."""
    for start in range(0, len(records), batch):
        group = records[start : start + batch]
        crf = BatchCRF([torch.from_numpy(r["image"]) for r in group], params, device=device)
        n_calls = max(len(r["calls"]) for r in group)
        for k in range(n_calls):  # pass k of every image that has one, in one batched call
            members = [r for r in group if len(r["calls"]) > k]
            if len(members) < len(group):  # an image without this pass: a smaller batch
                sub = BatchCRF([torch.from_numpy(r["image"]) for r in members], params, device=device)
            else:
                sub = crf
            qs = sub.marginals([torch.from_numpy(r["calls"][k]).to(device) for r in members])
            for r, q in zip(members, qs):
                q = q.cpu().numpy()
                row = compare(q, r["outputs"][k])
                row["labels"] = int(q.shape[0])
                if check_exact:
                    same_unary = pydensecrf_on_unary(r["image"], torch_unary(r["calls"][k], params), params)
                    row["exact"] = bool(np.array_equal(q, same_unary))
                r.setdefault("rows", []).append(row)
        log(f"  replayed {min(start + batch, len(records))}/{len(records)}")


def camvid_records(data: Path, count: int, params: DHRParams) -> list[dict]:
    """Refine the first ``count`` images with the recording CRF; their images and CRF calls."""
    records = []
    with CamsFile.open(data / "cams.h5") as cams, FeatsFile.open(data / "feats.h5") as feats:
        ids = cams.ids()[:count]
        for i, image_id in enumerate(ids):
            inputs = load_inputs(image_id, cams, feats, uss=params.steps.needs_uss, wss=params.steps.needs_wss)
            crf = RecordingCRF(inputs.image, params.crf)
            state = new_state(inputs.cam, inputs.labels, inputs.image, inputs.base, inputs.uss, inputs.wss, cams.background)
            run_stages([start_stages(state, params)], params, crfs=crf)
            records.append({"id": image_id, "image": np.ascontiguousarray(inputs.image), "calls": crf.calls, "outputs": crf.outputs})
            log(f"  refined {i + 1}/{len(ids)} {image_id}: {len(crf.calls)} CRF calls, labels {[len(c) for c in crf.calls]}")
    return records


def generated_records(data: Path, count: int, size: tuple[int, int], params: CRFParams, seed: int) -> list[dict]:
    """``count`` generated scenes of ``size`` (see the module docstring), pydensecrf's output."""
    gen = torch.Generator().manual_seed(seed)
    records = []
    with CamsFile.open(data / "cams.h5") as cams:
        ids = cams.ids()
        for i in range(count):
            photo = torch.from_numpy(cams.read_image(ids[(7 * i + seed) % len(ids)])).permute(2, 0, 1)[None].float()
            image = F.interpolate(photo, size=size, mode="bilinear", align_corners=False)[0]
            image = image.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
            labels = int(torch.randint(2, 22, (1,), generator=gen))
            grid = (max(2, size[0] // 16), max(2, size[1] // 16))
            cams_like = F.interpolate(torch.rand(1, labels, *grid, generator=gen), size=size, mode="bilinear", align_corners=False)[0]
            probs = cams_like**3 + 0.05 * torch.rand(labels, *size, generator=gen)
            probs = (probs / probs.sum(dim=0, keepdim=True)).numpy().astype(np.float32)
            ref = RecordingCRF(image, params).marginals(probs)
            records.append({"id": f"gen{size[0]}x{size[1]}-{i}", "image": image, "calls": [probs], "outputs": [ref]})
            log(f"  generated {i + 1}/{count} {size[0]}x{size[1]}, {labels} labels")
    return records


def summarise(name: str, records: list[dict]) -> dict:
    per_image = []
    total = {"pixels": 0, "same": 0, "values": 0, "sum_abs": 0.0, "max_abs": 0.0, "calls": 0, "exact": 0}
    for r in records:
        rows = r.get("rows", [])
        pixels, same = sum(x["pixels"] for x in rows), sum(x["same"] for x in rows)
        per_image.append({
            "id": r["id"], "labels": [x["labels"] for x in rows], "agreement": same / pixels if pixels else None,
            "max_abs": max((x["max_abs"] for x in rows), default=0.0),
            "mean_abs": sum(x["sum_abs"] for x in rows) / max(1, sum(x["values"] for x in rows)),
            "exact": [x.get("exact") for x in rows],
        })
        total["pixels"] += pixels
        total["same"] += same
        total["values"] += sum(x["values"] for x in rows)
        total["sum_abs"] += sum(x["sum_abs"] for x in rows)
        total["max_abs"] = max(total["max_abs"], per_image[-1]["max_abs"])
        total["calls"] += len(rows)
        total["exact"] += sum(1 for x in rows if x.get("exact"))
    agreements = [p["agreement"] for p in per_image if p["agreement"] is not None]
    return {
        "name": name, "images": len(records), "calls": total["calls"],
        "agreement": total["same"] / total["pixels"] if total["pixels"] else None,
        "min_image_agreement": min(agreements) if agreements else None,
        "images_below_target": sum(1 for a in agreements if a < TARGET),
        "max_abs": total["max_abs"], "mean_abs": total["sum_abs"] / max(1, total["values"]),
        "exact_calls": total["exact"], "per_image": per_image,
    }


def print_summary(s: dict, *, show_images: bool) -> None:
    print(f"\n== {s['name']}: {s['images']} images, {s['calls']} CRF calls")
    if show_images:
        print(f"{'image':24s} {'labels':>10s} {'agreement':>10s} {'max |dQ|':>10s} {'mean |dQ|':>10s} exact")
        for p in s["per_image"]:
            agreement = f"{100 * p['agreement']:9.3f}%" if p["agreement"] is not None else "      -"
            labels = ",".join(map(str, p["labels"]))
            exact = ",".join("-" if e is None else ("yes" if e else "no") for e in p["exact"])
            print(f"{p['id']:24s} {labels:>10s} {agreement} {p['max_abs']:10.2e} {p['mean_abs']:10.2e} {exact}")
    if s["agreement"] is None:
        print("no CRF call")
        return
    print(f"total argmax agreement {100 * s['agreement']:.4f} %   (target >= {100 * TARGET:.1f} %)")
    print(f"lowest image           {100 * s['min_image_agreement']:.4f} %   images below target: {s['images_below_target']}")
    print(f"marginals |dQ|         max {s['max_abs']:.3e}   mean {s['mean_abs']:.3e}")
    print(f"bit-identical to pydensecrf on the same unary: {s['exact_calls']} of {s['calls']} calls")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="directory with cams.h5 and feats.h5 (e.g. camvid-val/)")
    parser.add_argument("--images", type=int, default=None, help="CamVid images to use (default: all)")
    parser.add_argument("--generated", type=int, default=4, help="generated scenes per size (333x500, 427x640); 0 = none")
    parser.add_argument("--device", default="cpu", help="torch device of the torch CRF (cpu, cuda, ...)")
    parser.add_argument("--batch", type=int, default=4, help="images per torch CRF batch")
    parser.add_argument("--no-exact", action="store_true", help="skip the same-unary bit-exactness check (one more pydensecrf run per call)")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    for name in ("cams.h5", "feats.h5"):
        if not (args.data / name).is_file():
            parser.error(f"{args.data / name}: no such file")
    torch.set_num_threads(1)
    device = torch.device(args.device)
    params = DHRParams()
    start = time.perf_counter()
    report = {"device": str(device), "torch": torch.__version__, "target": TARGET, "sets": []}

    log(f"CamVid: refining with the recording pydensecrf CRF ({args.data})")
    records = camvid_records(args.data, args.images if args.images is not None else 10**9, params)
    log("CamVid: replaying through the torch CRF")
    replay(records, params.crf, device, args.batch, not args.no_exact)
    report["sets"].append(summarise(f"CamVid val ({args.data.name})", records))
    for size, seed in (((333, 500), 1), ((427, 640), 2)):
        if args.generated:
            log(f"generated {size[0]}x{size[1]}")
            gen = generated_records(args.data, args.generated, size, params.crf, seed)
            replay(gen, params.crf, device, args.batch, not args.no_exact)
            report["sets"].append(summarise(f"generated {size[0]}x{size[1]}", gen))
    for s in report["sets"]:
        print_summary(s, show_images=True)
    report["seconds"] = time.perf_counter() - start
    ok = all(s["agreement"] is None or (s["agreement"] >= TARGET and s["images_below_target"] == 0) for s in report["sets"])
    print(f"\ncontract (>= {100 * TARGET:.1f} % per image and in total): {'met' if ok else 'NOT met'}   ({report['seconds']:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
