"""Interruptions and concurrent runs of ``dhr-label refine`` (issue 5).

Real subprocesses get real signals: Ctrl-C (SIGINT to the process group, as a terminal sends
it) must stop the workers promptly, leave no temporary file, print the summary so far and exit
130; SIGKILL at any moment followed by the same command must finish the job with masks
byte-identical to an uninterrupted run. A second run on the same output directory must be
refused without disturbing the first.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dhr_label.runtime.outdir import MTIME_SLACK, finished_unreported, output_lock
from dhr_label.runtime.selection import Shard
from helpers_h5 import cli_command, make_dataset, masks_in, read_json, refine_args, run_refine, temporaries

N = 120  # images: a two-worker run lasts long enough to be interrupted in the middle, even on a loaded box
MANIFEST = "dhr-label-manifest.json"
WAIT = 60.0  # seconds allowed for a subprocess to reach a state (a loaded CI box is slow)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("resume") / "in", N, size=(24, 32))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The masks of an uninterrupted run (in this process, one worker)."""
    out = tmp_path_factory.mktemp("reference") / "masks"
    result = run_refine(data, out)
    assert result.exit_code == 0, result.stderr
    return masks_in(out)


def start(data, out: Path, workers: int = 2) -> subprocess.Popen:
    """``dhr-label refine`` in its own process group (signals reach its workers too)."""
    return subprocess.Popen(
        cli_command() + refine_args(data, out, workers=workers),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def wait_for(condition, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (exit {process.returncode}) before {what}: {process.stderr.read()}")
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            raise AssertionError(f"no {what} after {WAIT} s")
        time.sleep(0.01)


def some_masks(out: Path):
    return lambda: out.exists() and any(out.glob("*.png"))


def test_ctrl_c_stops_workers_leaves_no_temporaries_and_exits_130(data, reference, tmp_path):
    out = tmp_path / "masks"
    process = start(data, out)
    wait_for(some_masks(out), process, "first mask")
    os.killpg(process.pid, signal.SIGINT)
    sent = time.monotonic()
    stdout, stderr = process.communicate(timeout=WAIT)
    assert time.monotonic() - sent < 15.0, "the workers did not stop promptly"
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "dhr-label refine (interrupted)" in stderr  # the summary so far
    assert stdout == ""
    masks = masks_in(out)
    assert 0 < len(masks) < N, "the run was not interrupted in the middle"
    time.sleep(0.5)
    assert masks_in(out) == masks, "a worker kept writing after the run ended"
    assert temporaries(out) == []
    manifest = read_json(out / MANIFEST)
    assert manifest["interrupted"] is True
    assert manifest["counts"]["done"] == len(masks)  # masks written but not yet reported count too
    assert manifest["counts"]["not_run"] == N - len(masks)
    for image_id, png in masks.items():
        assert png == reference[image_id]


def test_sigkill_then_the_same_command_finishes_with_identical_masks(data, reference, tmp_path):
    out = tmp_path / "masks"
    process = start(data, out)
    wait_for(some_masks(out), process, "first mask")
    os.killpg(process.pid, signal.SIGKILL)  # the parent and its workers, as a dead node
    process.communicate(timeout=WAIT)
    before = masks_in(out)
    assert 0 < len(before) < N, "the run was not killed in the middle"
    assert not (out / MANIFEST).exists()
    # What a worker killed in the middle of a write leaves: a partial file under a temporary name.
    last = f"img_{N - 1:03d}"
    stale = out / f".{last}.png.0badc0de-x1y2z3.dhr-tmp"
    stale.write_bytes(reference[last][:40])

    again = subprocess.run(cli_command() + refine_args(data, out, workers=2), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    counts = read_json(out / MANIFEST)["counts"]
    assert counts["skipped"] == len(before) and counts["done"] == N - len(before) and counts["failed"] == 0
    assert temporaries(out) == []
    assert masks_in(out) == reference


def test_a_second_run_on_the_same_directory_is_refused(data, tmp_path):
    out = tmp_path / "masks"
    first = start(data, out, workers=1)
    lock = out / ".dhr-label.lock"
    wait_for(lambda: lock.exists() and lock.read_text().startswith(f"{first.pid} "), first, "lock")
    second = run_refine(data, out)
    assert second.exit_code == 1
    assert second.stderr.startswith(f"error: another dhr-label run (pid {first.pid} on ")
    assert f"is writing to {out}; wait for it to finish or use another --out" in second.stderr
    assert "Traceback" not in second.stderr
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr  # the first run was not disturbed
    manifest = read_json(out / MANIFEST)
    assert manifest["counts"]["done"] == N and manifest["failures"] == []
    assert len(masks_in(out)) == N and temporaries(out) == []


# ----------------------------------------------------------------------------------------------
# Temporaries belong to their run: deterministic checks in this process
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def small(tmp_path):
    return make_dataset(tmp_path / "in", 4, size=(16, 20))


def test_a_refused_run_does_not_touch_the_running_runs_temporaries(small, tmp_path):
    out = tmp_path / "masks"
    out.mkdir()
    with output_lock(out, Shard(), token="aaaa"):
        in_flight = out / ".img_000.png.aaaa-123.dhr-tmp"  # the running run, mid-write
        in_flight.write_bytes(b"half a png")
        refused = run_refine(small, out)
        assert refused.exit_code == 1 and "another dhr-label run" in refused.stderr
        assert in_flight.exists()
    assert not in_flight.exists()  # the owner removes its own temporaries when it ends


def test_concurrent_shards_share_a_directory_and_stale_temporaries_wait(small, tmp_path):
    out = tmp_path / "masks"
    out.mkdir()
    stale = out / ".img_003.png.dead-456.dhr-tmp"  # from a run killed long ago
    with output_lock(out, Shard(1, 2), token="bbbb"):
        in_flight = out / ".img_001.png.bbbb-789.dhr-tmp"
        in_flight.write_bytes(b"half a png")
        stale.write_bytes(b"old")
        other = run_refine(small, out, "--shard", "2/2")
        assert other.exit_code == 0, other.stderr  # a different shard runs beside it
        # Another run is writing: neither its temporaries nor unknown ones may be removed.
        assert in_flight.exists() and stale.exists()
    alone = run_refine(small, out, "--shard", "1/2")
    assert alone.exit_code == 0
    assert temporaries(out) == []  # no other run active: stale temporaries are removed
    assert sorted(masks_in(out)) == small.ids


def _loky_workers(parent: int) -> list[int]:
    found = []
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        command = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"loky" in command and b"resource_tracker" not in command:
            found.append(int(child))
    return found


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the workers through /proc")
def test_a_dead_worker_stops_the_run_with_a_summary_and_the_rerun_finishes(data, reference, tmp_path):
    out = tmp_path / "masks"
    process = start(data, out)
    wait_for(some_masks(out), process, "first mask")
    workers = _loky_workers(process.pid)
    assert workers, "no loky worker found"
    os.kill(workers[0], signal.SIGKILL)  # as the out-of-memory killer would
    _, stderr = process.communicate(timeout=WAIT)
    assert process.returncode == 1
    assert "error: the run stopped: TerminatedWorkerError" in stderr
    assert "Traceback" not in stderr
    manifest = read_json(out / MANIFEST)
    assert manifest["error"].startswith("the run stopped: TerminatedWorkerError")
    assert manifest["counts"]["done"] == len(masks_in(out))
    assert temporaries(out) == []
    again = run_refine(data, out)
    assert again.exit_code == 0, again.stderr
    assert masks_in(out) == reference


def test_masks_written_before_an_overwrite_run_are_not_counted_as_its_work(tmp_path):
    now = time.time()
    for name, age in (("old", 3600.0), ("new", 0.0)):
        (tmp_path / f"{name}.png").write_bytes(b"png")
        os.utime(tmp_path / f"{name}.png", (now - age, now - age))
    ids = ["old", "new", "absent"]
    assert finished_unreported(tmp_path, ids) == ["old", "new"]  # without --overwrite: existence
    assert finished_unreported(tmp_path, ids, since=now) == ["new"]
    assert finished_unreported(tmp_path, ids, since=now + MTIME_SLACK / 2) == ["new"]  # coarse clocks
