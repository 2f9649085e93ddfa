"""How close ``dhr-label refine`` runs to its floor, the two DenseCRF calls of every image.

For each dataset given (the CamVid benchmark, generated inputs from make_inputs.py) it prints:

1. per-image wall time of the refine engine (read, DHR, write: what a worker does for an
   image) next to the bare cost of the same two DenseCRF calls done with pydensecrf
   directly (same images, same unaries, same kernels, a fresh DenseCRF2D per call), and
   their ratio (target <= 1.15); the two are timed image by image, alternately, so that
   the load of a shared machine hits both alike;
2. the per-stage breakdown (read, seed scores, seed mask, heat maps, final mask, write), and
   the two CRF calls inside the seed-mask and final-mask stages;
3. with ``--parallel N``: the parallel efficiency of ``dhr-label refine`` from 1 to 2
   workers on N images, ``T1 / (2 T2)`` (target >= 90 %), from the command's own timing;
4. with ``--rss DIR ...``: the peak resident memory of a whole ``dhr-label refine -j 2`` run
   (parent and workers summed, sampled every 20 ms) on each directory;
5. with ``--compare-with DIR`` (a checkout of another version, e.g. ``git worktree add /tmp/v04
   v0.4``): the refine engine of that version and of this one (a worker's whole work for an
   image: read, DHR, write), image by image and alternately, in long-lived worker processes of
   each version (one, then two at a time on two images: ``-j 1`` and ``-j 2``), with the same
   class prototypes, on ``--compare-images`` images; the pooling of the prototypes timed apart;
   ``--repeat`` rounds. The ratio of the summed times is the figure: pairing every image with
   itself and alternating makes the load of a shared machine hit both versions alike;
6. the machine, its load average before and after (the ratios come from one run).

Every process runs with one BLAS/OpenMP thread (as the workers do): two threads per
process on a busy 2-core machine made small matrix products 20x slower.

Usage::

    python benchmarks/speed.py --data /path/to/camvid-val --data /tmp/gen-voc \\
        --images 12 --parallel 24 --rss /tmp/gen-tiny-100 /tmp/gen-tiny-1000
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy is imported: one thread per process, as the workers

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from dhr_label.io.contract import CamsFile  # noqa: E402
from dhr_label.params import DHRParams  # noqa: E402
from dhr_label.presets import preset_from_classes  # noqa: E402
from dhr_label.runtime.outcomes import MaskTarget  # noqa: E402
from dhr_label.runtime.refine.images import RefineJob, make_mask  # noqa: E402

STEPS = ("read", "seed_scores", "seed_mask", "heat_maps", "final_mask", "write")


# ----------------------------------------------------------------------------------------------
# The machine
# ----------------------------------------------------------------------------------------------
def machine() -> dict:
    """CPU model, cores this process may use, memory, versions."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    import h5py
    import torch

    return {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)),
        "memory": memory,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "h5py": h5py.__version__,
    }


# ----------------------------------------------------------------------------------------------
# 1-2: engine vs bare DenseCRF, image by image
# ----------------------------------------------------------------------------------------------
class CRFRecorder:
    """Records the (image, channel values) of every DenseCRF call, for the bare re-run."""

    def __init__(self):
        # pydensecrf is imported where it is used: crf_speed.py reads machine() on CUDA boxes without it.
        from dhr_label.core.crf import pydense as crf_module

        self.crf_module = crf_module
        self.calls: list[tuple[np.ndarray, np.ndarray]] = []
        self.seconds: list[float] = []  # of each call inside the engine
        self._original = crf_module.PydenseCRF.marginals

    def __enter__(self):
        recorder = self

        def recording(crf, probs):
            recorder.calls.append((crf.image, np.array(probs, dtype=np.float32)))
            start = time.perf_counter()
            out = recorder._original(crf, probs)
            recorder.seconds.append(time.perf_counter() - start)
            return out

        self.crf_module.PydenseCRF.marginals = recording
        return self

    def __exit__(self, *exc):
        self.crf_module.PydenseCRF.marginals = self._original


def bare_crf_seconds(calls, params, *, reuse: bool = False) -> float:
    """Seconds of the same DenseCRF calls with pydensecrf alone.

    A fresh model per call (what a plain script does), or with ``reuse`` one model for the
    calls of an image with the same label count (the lean floor: the set-up paid once). The
    unary (-log of the clipped values) is prepared beforehand and not counted.
    """
    import pydensecrf.densecrf as dcrf

    p = params.crf
    prepared = []
    for image, probs in calls:
        unary = -np.log(np.maximum(probs, p.unary_clip)).reshape(len(probs), -1)
        prepared.append((np.ascontiguousarray(image), np.ascontiguousarray(unary, dtype=np.float32)))
    start = time.perf_counter()
    model, key = None, None
    for image, unary in prepared:
        height, width = image.shape[:2]
        if not reuse or key != (id(image), unary.shape[0]):
            model = dcrf.DenseCRF2D(width, height, unary.shape[0])
            model.addPairwiseGaussian(sxy=p.gauss_sxy, compat=p.gauss_compat)
            model.addPairwiseBilateral(sxy=p.bilateral_sxy, srgb=p.bilateral_srgb, rgbim=image, compat=p.bilateral_compat)
            key = (id(image), unary.shape[0])
        model.setUnaryEnergy(unary)
        np.asarray(model.inference(p.iterations))
    return time.perf_counter() - start


def engine_vs_floor(data: Path, count: int, params: DHRParams) -> dict:
    """Time ``make_mask`` and the bare CRF calls on the first ``count`` images of ``data``."""
    cams, feats = data / "cams.h5", data / "feats.h5"
    with CamsFile.open(cams) as cams_file:
        ids = cams_file.ids()[:count]
        preset = preset_from_classes(cams_file.classes, cams_file.background)
    out = Path(tempfile.mkdtemp(prefix="dhr-speed-"))
    job = RefineJob(cams, feats, params, preset.background, MaskTarget(out, preset.palette, "speed", "speed"))
    make_mask(job, ids[0])  # opens the files, warms the interpreter; not counted
    engine, bare, lean = [], [], []
    steps = dict.fromkeys(STEPS, 0.0)
    crf_calls = [0.0, 0.0]  # the first and the second CRF of an image, inside the engine
    labels_per_call = []
    masks = {}
    for image_id in ids:
        with CRFRecorder() as recorder:  # an untimed pass records the CRF inputs
            make_mask(job, image_id)
        start = time.perf_counter()
        result = make_mask(job, image_id)
        engine.append(time.perf_counter() - start)
        if result.status != "done":
            raise SystemExit(f"{image_id}: {result.reason}")
        bare.append(bare_crf_seconds(recorder.calls, params))
        lean.append(bare_crf_seconds(recorder.calls, params, reuse=True))
        for key in STEPS:
            steps[key] += result.timings.get(key, 0.0)
        for index, seconds in enumerate(recorder.seconds[:2]):
            crf_calls[index] += seconds
        labels_per_call.extend(len(probs) for _, probs in recorder.calls)
        masks[image_id] = (out / f"{image_id}.png").read_bytes()
    sizes = {tuple(image.shape[:2]) for image, _ in recorder.calls}
    return {
        "data": str(data),
        "images": len(ids),
        "image_sizes": sorted(sizes),
        "crf_labels_mean": float(np.mean(labels_per_call)),
        "engine_s": float(np.mean(engine)),
        "bare_crf_s": float(np.mean(bare)),
        "lean_crf_s": float(np.mean(lean)),
        "ratio": float(np.sum(engine) / np.sum(bare)),
        "ratio_lean": float(np.sum(engine) / np.sum(lean)),
        "steps_s": {k: v / len(ids) for k, v in steps.items()},
        "crf_calls_s": [c / len(ids) for c in crf_calls],
        "out": str(out),
    }


# ----------------------------------------------------------------------------------------------
# 3-4: the command, parallel efficiency and peak memory
# ----------------------------------------------------------------------------------------------
def refine_command(data: Path, out: Path, workers: int, extra: list[str]) -> list[str]:
    classes = ["--classes", str(data / "classes.txt")] if (data / "classes.txt").exists() else []
    return [
        sys.executable, "-m", "dhr_label", "refine", "--cams", str(data / "cams.h5"), "--feats", str(data / "feats.h5"),
        "--out", str(out), "--workers", str(workers), "--overwrite", "--json", *classes, *extra,
    ]


def run_command(command: list[str], *, sample_rss: bool = False, checkout: Path | None = None) -> tuple[dict, float, int, float]:
    """Run ``dhr-label refine`` (of ``checkout`` when given: its package first on the path); its
    JSON summary, wall seconds, the peak summed RSS of its process tree (bytes, 0 unless
    ``sample_rss``) and the CPU seconds of the whole tree."""
    import resource

    import psutil

    env = dict(os.environ)
    if checkout is not None:
        env["PYTHONPATH"] = str(checkout) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0
    stop = threading.Event()

    def sample():
        nonlocal peak
        root = psutil.Process(process.pid)
        while not stop.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                total = 0
                for proc in tree:
                    try:
                        total += proc.memory_info().rss
                    except psutil.Error:
                        pass
                peak = max(peak, total)
            except psutil.Error:
                return
            stop.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    if sample_rss:
        sampler.start()
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - start
    stop.set()
    if sample_rss:
        sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return json.loads(stdout.strip().splitlines()[-1]), wall, peak, cpu


def parallel_efficiency(data: Path, count: int) -> dict:
    """``dhr-label refine`` on ``count`` images with 1 then 2 workers."""
    rows = {}
    for workers in (1, 2):
        load = os.getloadavg()[0]
        with tempfile.TemporaryDirectory(prefix="dhr-speed-par-") as out:
            summary, wall, _, cpu = run_command(refine_command(data, Path(out), workers, ["--limit", str(count)]))
        rows[workers] = {"seconds": summary["seconds"], "wall": wall, "cpu": cpu, "load_before": load}
    return {
        "data": str(data),
        "images": count,
        "t1_s": rows[1]["seconds"],
        "t2_s": rows[2]["seconds"],
        "efficiency": rows[1]["seconds"] / (2 * rows[2]["seconds"]),
        # Cores the runs got (CPU seconds of the process tree over wall time): a busy machine
        # gives a 2-worker run less than 2, and no scaling can show then.
        "cores_1": rows[1]["cpu"] / rows[1]["wall"],
        "cores_2": rows[2]["cpu"] / rows[2]["wall"],
        "cpu_per_image_1": rows[1]["cpu"] / count,
        "cpu_per_image_2": rows[2]["cpu"] / count,
        "load_1": rows[1]["load_before"],
        "load_2": rows[2]["load_before"],
    }


#: A worker of one checkout: reads ids on stdin, answers the seconds of its engine per image.
#: Written against the names of both layouts (0.4's runtime.refine.cpu.refine_one, 0.5's
#: runtime.refine.images.make_mask): a benchmark of versions must run the other one's code.
_WORKER = r"""
import json, os, sys, tempfile, time
from pathlib import Path
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch; torch.set_num_threads(1)
from dhr_label.io.contract import CamsFile
from dhr_label.params import DHRParams
from dhr_label.presets import preset_from_classes
from dhr_label.runtime.outcomes import MaskTarget
from dhr_label.runtime.prototypes import from_file
try:
    from dhr_label.runtime.refine.images import RefineJob, make_mask as engine
except ImportError:
    from dhr_label.runtime.refine.cpu import RefineJob, refine_one as engine
data, prototypes = Path(sys.argv[1]), Path(sys.argv[2])
with CamsFile.open(data / "cams.h5") as cams:
    preset = preset_from_classes(cams.classes, cams.background)
params = DHRParams()
protos = from_file(prototypes, num_classes=len(preset.classes), wss=True).prototypes
out = Path(tempfile.mkdtemp(prefix="dhr-speed-eng-"))
job = RefineJob(data / "cams.h5", data / "feats.h5", params, preset.background,
                MaskTarget(out, preset.palette, "speed", "speed"), prototypes=protos)
for line in sys.stdin:
    image_id = line.strip()
    t = time.perf_counter()
    result = engine(job, image_id)
    print(json.dumps({"id": image_id, "s": time.perf_counter() - t, "status": result.status}), flush=True)
"""


class _Worker:
    """A long-lived engine process of one checkout."""

    def __init__(self, checkout: Path, data: Path, prototypes: Path):
        env = dict(os.environ, PYTHONPATH=str(checkout), OMP_NUM_THREADS="1")
        self.process = subprocess.Popen([sys.executable, "-c", _WORKER, str(data), str(prototypes)], env=env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def send(self, image_id: str) -> None:
        self.process.stdin.write(image_id + "\n")
        self.process.stdin.flush()

    def answer(self) -> float:
        reply = json.loads(self.process.stdout.readline())
        if reply["status"] != "done":
            raise SystemExit(f"{reply['id']}: {reply['status']}")
        return reply["s"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def pooling_seconds(checkout: Path, data: Path) -> float:
    """Seconds the prototypes' pooling of ``checkout`` takes on every image of ``data`` (2 workers)."""
    code = ("import sys, time; from pathlib import Path; from dhr_label.runtime.prototypes import PoolJob, pool; "
            "from dhr_label.io.contract import CamsFile; d = Path(sys.argv[1]); c = CamsFile.open(d / 'cams.h5'); "
            "n = len(c.classes); c.close(); t = time.perf_counter(); pool(PoolJob(d / 'cams.h5', d / 'feats.h5', n, wss=True), "
            "workers=2); print(time.perf_counter() - t)")
    env = dict(os.environ, PYTHONPATH=str(checkout), OMP_NUM_THREADS="1")
    return float(subprocess.run([sys.executable, "-c", code, str(data)], env=env, text=True, capture_output=True,
                                check=True).stdout.strip().splitlines()[-1])


def versions(data: Path, count: int, other: Path, repeat: int) -> dict:
    """The refine engine of ``other`` (a checkout) against this tree's, image by image, with 1
    and 2 workers at a time (see the module docstring); the prototypes' pooling apart."""
    here = Path(__file__).resolve().parents[1]
    with CamsFile.open(data / "cams.h5") as cams:
        ids = cams.ids()[:count]
    prototypes = Path(tempfile.mkdtemp(prefix="dhr-speed-protos-")) / "prototypes.npz"
    subprocess.run([sys.executable, "-m", "dhr_label", "refine", "--cams", str(data / "cams.h5"), "--feats",
                    str(data / "feats.h5"), "--out", str(prototypes.parent / "masks"), "--limit", "1", "--workers", "2"]
                   + (["--classes", str(data / "classes.txt")] if (data / "classes.txt").exists() else []),
                   check=True, capture_output=True)
    (prototypes.parent / "masks" / "dhr-label-prototypes.npz").rename(prototypes)
    checkouts = {"other": other, "this": here}
    rows: dict = {}
    for workers in (1, 2):
        pool = {name: [_Worker(path, data, prototypes) for _ in range(workers)] for name, path in checkouts.items()}
        for name in pool:  # warm-up: imports, file handles, the first lattice
            for w in pool[name]:
                w.send(ids[0])
            [w.answer() for w in pool[name]]
        totals = {"other": 0.0, "this": 0.0}
        for _ in range(repeat):
            for start in range(0, len(ids), workers):
                group = ids[start : start + workers]
                for name in (("other", "this") if start % (2 * workers) == 0 else ("this", "other")):
                    t = time.perf_counter()
                    for w, image_id in zip(pool[name], group):
                        w.send(image_id)
                    [w.answer() for w in pool[name][: len(group)]]
                    totals[name] += time.perf_counter() - t
        for workers_of in pool.values():
            for w in workers_of:
                w.close()
        images = repeat * len(ids)
        rows[workers] = {"per_image_s": {k: v / images for k, v in totals.items()}, "ratio": totals["this"] / totals["other"]}
    pooling = {name: [pooling_seconds(path, data) for _ in range(repeat)] for name, path in checkouts.items()}
    return {"data": str(data), "images": len(ids), "repeat": repeat, "other": str(other), "engine": rows,
            "pooling_s": pooling, "pooling_ratio": float(np.median(pooling["this"]) / np.median(pooling["other"]))}


def device_throughput(data: Path, count: int) -> dict | None:
    """Images per second of ``refine --device cpu`` and ``--device cuda`` (all cores), or None
    without a CUDA device."""
    import torch

    if not torch.cuda.is_available():
        return None
    rows = {}
    for device in ("cpu", "cuda"):
        with tempfile.TemporaryDirectory(prefix="dhr-speed-dev-") as out:
            summary, _, _, _ = run_command(refine_command(data, Path(out), os.cpu_count() or 1, ["--limit", str(count), "--device", device]))
        rows[device] = summary["images_per_second"]
    return {"data": str(data), "images": count, "images_per_second": rows}


def peak_memory(data: Path, workers: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="dhr-speed-rss-") as out:
        summary, wall, peak, _ = run_command(refine_command(data, Path(out), workers, []), sample_rss=True)
    return {"data": str(data), "images": summary["counts"]["done"], "workers": workers, "peak_rss_mib": peak / 2**20, "wall_s": wall}


# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, action="append", default=[], help="a directory with cams.h5 and feats.h5 (repeatable)")
    parser.add_argument("--images", type=int, default=10, help="images per dataset for the floor comparison")
    parser.add_argument("--parallel", type=int, default=0, help="images for the 1 -> 2 workers run (on the first --data)")
    parser.add_argument("--repeat", type=int, default=1, help="pairs of 1- and 2-worker runs (a shared machine is noisy)")
    parser.add_argument("--rss", type=Path, nargs="*", default=[], help="directories for the peak-memory runs (-j 2)")
    parser.add_argument("--device-images", type=int, default=0, help="images for --device cpu vs cuda throughput (needs a GPU; first --data)")
    parser.add_argument("--compare-with", type=Path, help="a checkout of another version: refine of both, alternately (first --data)")
    parser.add_argument("--compare-images", type=int, default=16, help="images for --compare-with")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    params = DHRParams()
    report: dict = {"machine": machine(), "load_before": os.getloadavg()}
    print("machine:", json.dumps(report["machine"]))
    print(f"load average before: {report['load_before']}")

    report["floor"] = []
    for data in args.data if args.images else []:
        row = engine_vs_floor(data, args.images, params)
        report["floor"].append(row)
        total = row["engine_s"]
        print(f"\n== {data}: {row['images']} images {row['image_sizes']}, {row['crf_labels_mean']:.1f} labels per CRF call")
        print(f"engine per image   {total * 1e3:8.1f} ms")
        print(f"bare 2 x DenseCRF  {row['bare_crf_s'] * 1e3:8.1f} ms   (a fresh pydensecrf model per call)")
        print(f"ratio              {row['ratio']:8.3f}   (target <= 1.15)")
        print(f"lean floor         {row['lean_crf_s'] * 1e3:8.1f} ms   (one model per image when the label counts agree)")
        print(f"ratio to lean      {row['ratio_lean']:8.3f}")
        accounted = sum(row["steps_s"].values())
        for key in STEPS:
            value = row["steps_s"][key]
            print(f"  {key:10s} {value * 1e3:8.1f} ms  {100 * value / total:5.1f} %")
        print(f"  {'other':10s} {(total - accounted) * 1e3:8.1f} ms  {100 * (total - accounted) / total:5.1f} %")
        first, second = row["crf_calls_s"]
        print(f"  of which CRF 1 {first * 1e3:.1f} ms (in seed_mask), CRF 2 {second * 1e3:.1f} ms (in final_mask)")

    if args.parallel and args.data:
        report["parallel"] = []
        print(f"\n== parallel, {args.parallel} images of {args.data[0]}, {args.repeat} pair(s) of runs")
        for _ in range(args.repeat):
            row = parallel_efficiency(args.data[0], args.parallel)
            report["parallel"].append(row)
            print(f"1 worker  {row['t1_s']:7.1f} s   2 workers {row['t2_s']:7.1f} s   efficiency {100 * row['efficiency']:.1f} %  (target >= 90 %)")
            print(
                f"  cores the runs got: {row['cores_1']:.2f} and {row['cores_2']:.2f} (load average before: {row['load_1']:.1f}, {row['load_2']:.1f}); "
                f"CPU per image {row['cpu_per_image_1']:.2f} s and {row['cpu_per_image_2']:.2f} s"
            )
        if args.repeat > 1:
            print(f"median efficiency {100 * float(np.median([r['efficiency'] for r in report['parallel']])):.1f} %")

    if args.compare_with and args.data:
        row = versions(args.data[0], args.compare_images, args.compare_with, args.repeat)
        report["versions"] = row
        print(f"\n== the refine engine of this tree against {row['other']}, {row['images']} images of {row['data']}, "
              f"{row['repeat']} round(s), image by image alternately")
        for workers in (1, 2):
            eng = row["engine"][workers]
            print(f"-j {workers}: per image this {eng['per_image_s']['this']:.3f} s, other {eng['per_image_s']['other']:.3f} s, "
                  f"ratio {eng['ratio']:.3f}")
        pool = row["pooling_s"]
        print(f"prototypes' pooling (every image, 2 workers): this {np.median(pool['this']):.2f} s, other "
              f"{np.median(pool['other']):.2f} s (median of {len(pool['this'])}), ratio {row['pooling_ratio']:.3f}")

    if args.device_images and args.data:
        row = device_throughput(args.data[0], args.device_images)
        report["device"] = row
        if row is None:
            print("\n== --device cuda: no CUDA device on this machine, not measured")
        else:
            rates = row["images_per_second"]
            print(f"\n== throughput, {row['images']} images of {row['data']}, all cores: cpu {rates['cpu']:.2f} img/s, cuda {rates['cuda']:.2f} img/s")

    report["rss"] = []
    for data in args.rss:
        row = peak_memory(data, 2)
        report["rss"].append(row)
        print(f"\n== peak RSS, {row['images']} images of {data}, -j {row['workers']}: {row['peak_rss_mib']:.0f} MiB (parent + workers), {row['wall_s']:.1f} s")

    report["load_after"] = os.getloadavg()
    print(f"\nload average after: {report['load_after']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
