"""The parts of the GPU check (benchmarks/gpu_check.sh): each a few steps, each step recorded.

Every part writes one summary, ``$OUT/<part>.json``, rewritten before and after every step
(a part cut off by a time limit still returns what it did, and names the step it was in), and
one log, ``$OUT/<part>.log``. The references come from the prepared folder
(benchmarks/gpu_prepare.py); nothing here needs pydensecrf.

Parts (budgets on an H100; ``--rehearse`` runs them on the CPU at tiny sizes, Triton under its
interpreter):

``tests`` (~2 min)  machine facts, the copy bandwidth, the CUDA-parametrised tests.
``crf``   (~4 min)  the recorded real CRF calls on the device with both kernels: argmax against
                    pydensecrf, bytes against the CPU's torch CRF, triton against eager, twice and
                    in another batch (determinism); CRF passes/s at 480x360 K=11 and 640x480 K=7,
                    eager and fused, batch 1/16/64, with peak memory.
``e2e``   (~3 min)  ``refine --device cuda`` on the prepared CamVid images repeated (I/O included):
                    images/s; twice (determinism); eager against triton; masks against the
                    CPU references; mIoU against the ground truth.
``oom``   (~2 min)  ``refine --device cuda`` under a memory cap (out-of-memory halving), and under
                    a cap too small for one image (the failure path).

Usage::

    python benchmarks/gpu_parts.py PART --prepared .gpu --out $OUT [--device cuda] [--rehearse]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BUDGET = {"tests": 170, "crf": 230, "e2e": 220, "oom": 150}  # seconds a part may take (limit: 240)
MASK_AGREEMENT = 0.995  # end to end, masks against the CPU's (the torch CRF's contract, README)


class Part:
    """One part's summary: steps appended as they run, the JSON rewritten after each."""

    def __init__(self, name: str, out: Path, args):
        self.name, self.args = name, args
        self.path, self.log_path = out / f"{name}.json", out / f"{name}.log"
        self.started = time.time()
        self.summary = {"part": name, "device": args.device, "rehearsal": args.rehearse, "status": "running", "steps": []}
        self.log_path.write_text("", encoding="utf-8")
        self.write()

    def left(self) -> float:
        return BUDGET[self.name] - (time.time() - self.started)

    def write(self) -> None:
        self.summary["seconds"] = round(time.time() - self.started, 1)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.summary, indent=1, default=str), encoding="utf-8")
        tmp.replace(self.path)

    def log(self, text: str) -> None:
        with self.log_path.open("a", encoding="utf-8") as f:
            f.write(text.rstrip() + "\n")
        print(text.rstrip(), file=sys.stderr, flush=True)

    def step(self, name: str, fn, *, needs: float = 0.0, expect=None):
        """Run ``fn()``; record its result or error. Skipped when less than ``needs`` seconds
        remain. ``expect(result)`` lists what the result should have shown and did not: the
        step is then recorded as failed, with its result."""
        record = {"step": name, "status": "running"}
        self.summary["steps"].append(record)
        if self.left() < needs:
            record.update(status="skipped", reason=f"{self.left():.0f} s left of the part's {BUDGET[self.name]} s, needs {needs:.0f}")
            self.write()
            return None
        self.write()
        start = time.time()
        try:
            result = fn()
            record.update(status="ok", result=result)
            missed = expect(result) if expect is not None else []
            if missed:
                record.update(status="failed", expected=missed)
        except Exception as exc:  # noqa: BLE001 - recorded, the next step still runs
            record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            self.log(traceback.format_exc())
            result = None
        record["seconds"] = round(time.time() - start, 1)
        self.write()
        self.log(f"[{self.name}] {name}: {record['status']} ({record['seconds']} s)")
        return result

    def finish(self) -> int:
        failed = [s["step"] for s in self.summary["steps"] if s["status"] == "failed"]
        self.summary["status"] = "failed" if failed else "ok"
        self.summary["failed_steps"] = failed
        self.write()
        return 1 if failed else 0

    def run(self, command: list[str], *, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
        """A subprocess, its output appended to the log; raises on a non-zero exit."""
        done = subprocess.run(command, capture_output=True, text=True, timeout=max(5.0, timeout), env=env, check=False)
        self.log(f"$ {' '.join(command)}\n{done.stderr[-4000:]}")
        if done.returncode != 0:
            raise RuntimeError(f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}")
        return done


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------
def prepared(args) -> dict:
    path = args.prepared / "prepared.json"
    if not path.is_file():
        raise SystemExit(f"{path}: not found; run `bash benchmarks/gpu_check.sh prepare DATA` first")
    return json.loads(path.read_text(encoding="utf-8"))


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sha(q) -> str:
    return hashlib.sha256(q.detach().cpu().numpy().astype(np.float32, copy=False).tobytes()).hexdigest()


def machine(args) -> dict:
    import torch

    facts = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
             "cpu_cores": os.cpu_count(), "numpy": np.__version__}
    from importlib.metadata import PackageNotFoundError, version

    for package in ("triton", "typer", "rich", "h5py", "pillow", "scipy", "joblib", "threadpoolctl", "pytest"):
        try:
            facts[package] = version(package)
        except PackageNotFoundError:
            facts[package] = None
    from dhr_label.core.crf.fused import triton_status

    facts["triton_status"] = triton_status().value
    if args.device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        facts.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count,
                     capability=f"{p.major}.{p.minor}")
    return facts


def copy_bandwidth(device, mib: int) -> float:
    """Device-to-device copy, bytes/s, read + write counted (median of 10)."""
    import torch

    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(times)


# ----------------------------------------------------------------------------------------------
# Part: tests
# ----------------------------------------------------------------------------------------------
def part_tests(part: Part) -> None:
    import torch

    args = part.args
    part.step("machine", lambda: machine(args))
    device = torch.device(args.device)
    part.step("copy_bandwidth_gb_s", lambda: copy_bandwidth(device, 8 if args.rehearse else 1024) / 1e9)
    # Every device-parametrised test: the CRF, the stages (an image's mask the same alone or in any
    # batch), the entry points, the online API, the batches executor (its CPU reference on the
    # torch CRF there: the CPU's and the device's must agree bit for bit). Tests whose reference
    # is pydensecrf, absent there, are reported as skipped.
    files = ["tests/core/crf/test_fused.py"] if args.rehearse else [
        "tests/core/crf", "tests/core/test_stages.py", "tests/core/test_dhr.py", "tests/core/test_tensors.py",
        "tests/core/test_online_api.py", "tests/runtime/test_batches.py"]

    def pytest():
        report = Path(tempfile.mkdtemp()) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--device", args.device,
                   f"--junitxml={report}", *files]
        if args.rehearse:
            command += ["-k", "mixed_batch or eight_launches"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=max(10, part.left() - 10), cwd=ROOT, check=False)
        part.log(done.stdout[-6000:] + done.stderr[-2000:])
        return {"exit": done.returncode, **junit_counts(report)}

    part.step("pytest", pytest, needs=30, expect=lambda r: [] if r["exit"] == 0 and r.get("failures") == 0 and r.get("errors") == 0
              else [f"every test passes (exit {r['exit']}, {r.get('failures')} failed, {r.get('errors')} errors)"])


def junit_counts(path: Path) -> dict:
    """Counts and the first failures of a JUnit XML report (pytest --junitxml)."""
    import xml.etree.ElementTree as ET

    if not path.is_file():
        return {"report": "missing"}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    problems = []
    for case in suite.iter("testcase"):
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                problems.append(f"{case.get('classname')}::{case.get('name')}: {(node.get('message') or '')[:200]}")
    skipped = {}
    for case in suite.iter("testcase"):
        node = case.find("skipped")
        if node is not None:
            reason = (node.get("message") or "")[:120]
            skipped[reason] = skipped.get(reason, 0) + 1
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "problems": problems[:15], "skip_reasons": skipped}


# ----------------------------------------------------------------------------------------------
# Parts: e2e, oom
# ----------------------------------------------------------------------------------------------
def refine_command(args, data: Path, out: Path, *extra: str) -> list[str]:
    info = prepared(args)
    return [sys.executable, "-m", "dhr_label", "refine", "--cams", str(data / "cams.h5"), "--feats", str(data / "feats.h5"),
            "--out", str(out), "--device", args.device, "--crf-backend", "torch", "--overwrite", "--json",
            "--workers", str(max(1, min(8, (os.cpu_count() or 2) - 1))), *info["refine_options"], *extra]


def compare_masks(a: Path, b: Path, ids: list[str]) -> dict:
    from PIL import Image

    same = total = missing = 0
    for image_id in ids:
        pa, pb = a / f"{image_id}.png", b / f"{image_id}.png"
        if not (pa.is_file() and pb.is_file()):
            missing += 1
            continue
        x, y = np.asarray(Image.open(pa)), np.asarray(Image.open(pb))
        same += int((x == y).sum())
        total += x.size
    return {"images": len(ids) - missing, "missing": missing, "pixel_agreement": same / total if total else None,
            "identical": same == total and missing == 0}


def part_e2e(part: Part) -> None:
    args = part.args
    info = prepared(args)
    data, ids = args.prepared / "data", info["ids"]
    work = Path(tempfile.mkdtemp(prefix="dhr-e2e-"))
    repeat = 2 if args.rehearse else 40
    big = work / "big"
    part.step("inputs", lambda: part.run([sys.executable, str(ROOT / "benchmarks" / "subset.py"), str(data), str(big),
                                          "--images", str(len(ids)), "--repeat", str(repeat)], timeout=60) and
              {"ids": len(ids) * repeat, "repeat": repeat})
    extra = () if args.rehearse else ("--batch-pixels", str(1 << 24))

    def refine(name, source, *more):
        def go():
            done = part.run(refine_command(args, source, work / name, *extra, *more), timeout=part.left() - 5)
            s = json.loads(done.stdout)
            return {k: s.get(k) for k in ("counts", "seconds", "images_per_second", "error")}
        return go

    kernels = ("--crf-kernels", "triton")
    done = lambda r: [] if (r["counts"] or {}).get("failed") == 0 and not r["error"] else ["every image done"]  # noqa: E731
    part.step("refine_triton", refine("triton", big, *kernels), needs=40, expect=done)
    part.step("refine_triton_again", refine("again", data, *kernels), needs=20, expect=done)
    part.step("refine_eager", refine("eager", data, "--crf-kernels", "eager"), needs=20, expect=done)
    identical = lambda r: [] if r["identical"] else [f"identical masks ({r['pixel_agreement']} of the pixels)"]  # noqa: E731
    part.step("determinism", lambda: compare_masks(work / "triton", work / "again", ids), expect=identical)
    part.step("triton_vs_eager", lambda: compare_masks(work / "triton", work / "eager", ids), expect=identical)
    for backend in ("pydensecrf", "torch"):
        part.step(f"vs_cpu_{backend}", lambda b=backend: compare_masks(work / "triton", args.prepared / "masks" / b, ids),
                  expect=lambda r: [] if (r["pixel_agreement"] or 0) >= MASK_AGREEMENT else [
                      f">= {MASK_AGREEMENT:.1%} of the pixels as the CPU's masks ({r['pixel_agreement']})"])
    if (data / "gt").is_dir():
        def score():
            command = [sys.executable, "-m", "dhr_label", "score", "--pred", str(work / "again"), "--gt", str(data / "gt"),
                       "--json", "--compare", str(args.prepared / "masks" / "pydensecrf")]
            s = json.loads(part.run(command, timeout=60).stdout)["summary"]
            return {"miou_device": s["miou"]["pred"], "miou_cpu_pydensecrf": s["miou"]["compare"]}
        part.step("score", score, needs=10)
    shutil.rmtree(work, ignore_errors=True)


CAP_SCRIPT = """
import atexit, json, sys, torch
fraction = float(sys.argv.pop(1))
if torch.cuda.is_available():
    torch.cuda.set_per_process_memory_fraction(fraction)
    atexit.register(lambda: print(json.dumps({"max_allocated": torch.cuda.max_memory_allocated()}), file=sys.stderr))
from dhr_label.cli import main
sys.argv[0] = "dhr-label"
sys.exit(main())
"""


def part_oom(part: Part) -> None:
    import torch

    args = part.args
    info = prepared(args)
    data, ids = args.prepared / "data", info["ids"]
    work = Path(tempfile.mkdtemp(prefix="dhr-oom-"))
    total = torch.cuda.get_device_properties(0).total_memory if args.device == "cuda" else 2**34

    def capped(name, cap_bytes, expect_ok):
        def go():
            command = refine_command(args, data, work / name, "--batch-pixels", str(1 << 24))
            command = [sys.executable, "-c", CAP_SCRIPT, str(cap_bytes / total), *command[3:]]
            done = subprocess.run(command, capture_output=True, text=True, timeout=max(10, part.left() - 5), check=False)
            part.log(f"$ {' '.join(command[3:])}\n{done.stderr[-4000:]}")
            s = json.loads(done.stdout) if done.stdout.strip() else {}
            row = {"cap_gib": cap_bytes / 2**30, "exit": done.returncode, "counts": s.get("counts"), "error": s.get("error"),
                   "failures": (s.get("failures") or [])[:3]}
            if expect_ok:
                row["vs_cpu_torch"] = compare_masks(work / name, args.prepared / "masks" / "torch", ids)
            return row
        return go

    def halves(r):
        missed = [] if r["exit"] == 0 and (r["counts"] or {}).get("failed") == 0 else ["every image done under the cap"]
        agreement = r["vs_cpu_torch"]["pixel_agreement"] or 0
        return missed + ([] if agreement >= MASK_AGREEMENT else [f">= {MASK_AGREEMENT:.1%} of the CPU's pixels ({agreement})"])

    def fails_cleanly(r):
        if args.device != "cuda":
            return [] if r["exit"] == 0 else ["no cap on the CPU: the run succeeds"]
        counts = r["counts"] or {}
        return [] if r["exit"] == 1 and counts.get("failed", 0) > 0 and counts.get("done", 0) == 0 and not r["error"] else [
            "exit 1, every image failed alone with a reason, no run-level error"]

    part.step("cap_1gib_halves", capped("capped", 2**30, True), needs=40, expect=halves)
    part.step("cap_too_small_fails_cleanly", capped("tiny", 2**24, False), needs=20, expect=fails_cleanly)
    shutil.rmtree(work, ignore_errors=True)


def part_crf(part: Part) -> None:
    """The ``crf`` part (benchmarks/gpu_crf_part.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_crf_part import part_crf as run

    run(part)


PARTS = {"tests": part_tests, "crf": part_crf, "e2e": part_e2e, "oom": part_oom}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=sorted(PARTS))
    parser.add_argument("--prepared", type=Path, default=ROOT / ".gpu")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rehearse", action="store_true", help="tiny sizes (the plumbing, on a CPU)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(1)
    part = Part(args.part, args.out, args)
    try:
        PARTS[args.part](part)
    except BaseException as exc:  # noqa: BLE001 - the summary says how the part ended
        part.summary["error"] = f"{type(exc).__name__}: {exc}"
        part.log(traceback.format_exc())
        part.finish()
        return 1
    return part.finish()


if __name__ == "__main__":
    sys.exit(main())
