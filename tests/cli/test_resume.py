"""Interruptions and concurrent runs of ``dhr-label refine``, in real subprocesses.

Real signals: Ctrl-C (SIGINT to the process group, as a terminal sends it), SIGTERM and SIGHUP
(what SLURM, Kubernetes, ``timeout`` and a closed terminal send) must stop the workers
promptly, leave no temporary file, write the manifest and the summary so far, and exit 130,
143, 129. SIGKILL at any moment followed by the same command must finish the job with masks
byte-identical to an uninterrupted run, and no worker may outlive a killed parent. A second
run on the same output directory must be refused without disturbing the first.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers_h5 import (
    alive,
    cli_command,
    last_run,
    make_dataset,
    masks_in,
    process_children,
    read_json,
    refine_args,
    run_refine,
    temporaries,
)

N = 120  # images: a two-worker run lasts long enough to be interrupted in the middle, even on a loaded box
WAIT = 60.0  # seconds allowed for a subprocess to reach a state (a loaded CI box is slow)
ORPHAN_GRACE = 10.0  # seconds a worker may take to notice its parent died (it checks every 0.5 s)
linux_only = pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the workers through /proc")


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


def start(data, out: Path, *extra: str, workers: int = 2) -> subprocess.Popen:
    """``dhr-label refine`` in its own process group (a group signal reaches its workers too), as
    a terminal's foreground job: with Ctrl-C's default action even when this test runs where
    SIGINT is ignored (a background job of a non-interactive shell ignores it, and so would the
    child, which Python then leaves without its KeyboardInterrupt handler)."""
    return subprocess.Popen(
        cli_command() + refine_args(data, out, *extra, workers=workers),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
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


def workers_of(process: subprocess.Popen) -> list[int]:
    """The refine process's loky workers (its children, loky's resource tracker aside)."""
    found = []
    for child in process_children(process.pid):
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"loky" in command and b"resource_tracker" not in command:
            found.append(child)
    return found


def wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


@linux_only
@pytest.mark.parametrize("sig, code, group", [
    (signal.SIGINT, 130, True),  # a terminal's Ctrl-C reaches the whole group
    (signal.SIGTERM, 143, False),  # a scheduler's pre-emption, to the parent alone
    (signal.SIGTERM, 143, True),  # ... or to the whole group (SLURM, timeout)
    (signal.SIGHUP, 129, False),  # the terminal went away
], ids=["int-group", "term", "term-group", "hup"])
def test_a_stop_signal_stops_workers_writes_the_manifest_and_exits_128_plus_n(data, reference, tmp_path, sig, code, group):
    out = tmp_path / "masks"
    process = start(data, out)
    wait_for(some_masks(out), process, "first mask")
    workers = workers_of(process)
    assert workers, "no loky worker found"
    (os.killpg if group else os.kill)(process.pid, sig)
    sent = time.monotonic()
    stdout, stderr = process.communicate(timeout=WAIT)
    assert time.monotonic() - sent < 15.0, "the workers did not stop promptly"
    assert process.returncode == code, stderr
    assert wait_gone(workers, ORPHAN_GRACE) == [], "a worker outlived the run"
    assert "Traceback" not in stderr and "leaked" not in stderr and "UserWarning" not in stderr, stderr
    assert f"dhr-label refine (interrupted by {'Ctrl-C' if sig == signal.SIGINT else signal.Signals(sig).name})" in stderr
    assert stdout == ""
    masks = masks_in(out)
    assert 0 < len(masks) < N, "the run was not interrupted in the middle"
    time.sleep(0.5)
    assert masks_in(out) == masks, "a worker kept writing after the run ended"
    assert temporaries(out) == []
    run = last_run(out)
    assert run["interrupted"] is True and run["status"] == "interrupted"
    assert run["counts"]["done"] == len(masks)  # masks written but not yet reported count too
    assert run["counts"]["not_run"] == N - len(masks)
    for image_id, png in masks.items():
        assert png == reference[image_id]
    again = run_refine(data, out)  # the same command finishes the job
    assert again.exit_code == 0, again.stderr
    assert masks_in(out) == reference
    assert last_run(out)["counts"] == {"selected": N, "done": N - len(masks), "skipped": len(masks),
                                       "skipped_other_settings": 0, "failed": 0, "not_run": 0}


@linux_only
def test_workers_of_a_killed_parent_exit_on_their_own(data, reference, tmp_path):
    out = tmp_path / "masks"
    process = start(data, out)
    wait_for(some_masks(out), process, "first mask")
    workers = workers_of(process)
    assert workers
    os.kill(process.pid, signal.SIGKILL)  # the parent alone: its workers are orphaned
    process.communicate(timeout=WAIT)
    assert wait_gone(workers, ORPHAN_GRACE) == [], "orphaned workers kept computing"
    again = run_refine(data, out)
    assert again.exit_code == 0, again.stderr
    assert masks_in(out) == reference


def test_sigkill_then_the_same_command_finishes_with_identical_masks(data, reference, tmp_path):
    out = tmp_path / "masks"
    process = start(data, out)
    wait_for(some_masks(out), process, "first mask")
    os.killpg(process.pid, signal.SIGKILL)  # the parent and its workers, as a dead node
    process.communicate(timeout=WAIT)
    before = masks_in(out)
    assert 0 < len(before) < N, "the run was not killed in the middle"
    assert last_run(out)["status"] == "running"  # recorded at the start: the directory knows its settings
    # What a worker killed in the middle of a write leaves: a partial file under a temporary name.
    last = f"img_{N - 1:03d}"
    stale = out / f".{last}.png.0badc0de-x1y2z3.dhr-tmp"
    stale.write_bytes(reference[last][:40])
    again = subprocess.run(cli_command() + refine_args(data, out, workers=2), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    counts = last_run(out)["counts"]
    assert counts["skipped"] == len(before) and counts["done"] == N - len(before) and counts["failed"] == 0
    assert temporaries(out) == []
    assert masks_in(out) == reference
    assert [r["status"] for r in read_json(out / "dhr-label-manifest.json")["runs"]] == ["running", "complete"]


def test_a_second_run_on_the_same_directory_is_refused(data, tmp_path):
    out = tmp_path / "masks"
    first = start(data, out, workers=1)
    lock = out / ".dhr-label.lock"
    wait_for(lambda: lock.exists() and f'"pid": {first.pid}' in lock.read_text(), first, "lock")
    second = run_refine(data, out)
    assert second.exit_code == 1
    assert second.stderr.startswith(f"error: another dhr-label run (pid {first.pid} on ")
    assert "refine, settings " in second.stderr  # which run holds it
    assert "Traceback" not in second.stderr
    _, stderr = first.communicate(timeout=180)
    assert first.returncode == 0, stderr  # the first run was not disturbed
    run = last_run(out)
    assert run["counts"]["done"] == N and run["failures"] == []
    assert len(masks_in(out)) == N and temporaries(out) == []


@linux_only
def test_a_dead_worker_stops_the_run_with_a_summary_and_the_rerun_finishes(data, reference, tmp_path):
    out = tmp_path / "masks"
    process = start(data, out)
    wait_for(some_masks(out), process, "first mask")
    workers = workers_of(process)
    assert workers, "no loky worker found"
    os.kill(workers[0], signal.SIGKILL)  # as the out-of-memory killer would
    _, stderr = process.communicate(timeout=WAIT)
    assert process.returncode == 1
    assert "error: the run stopped: TerminatedWorkerError" in stderr
    assert "Traceback" not in stderr
    run = last_run(out)
    assert run["error"].startswith("the run stopped: TerminatedWorkerError") and run["status"] == "stopped"
    assert run["counts"]["done"] == len(masks_in(out))
    assert temporaries(out) == []
    again = run_refine(data, out)
    assert again.exit_code == 0, again.stderr
    assert masks_in(out) == reference


def test_an_interrupted_overwrite_counts_only_its_own_masks_and_the_rerun_redoes_the_rest(data, reference, tmp_path):
    out = tmp_path / "masks"
    assert run_refine(data, out, "--row", "4").exit_code == 0  # other settings first
    row4 = masks_in(out)
    process = start(data, out, "--overwrite")
    wait_for(lambda: len([p for p in masks_in(out) if masks_in(out)[p] != row4[p]]) >= 2, process, "two new masks")
    os.killpg(process.pid, signal.SIGINT)
    process.communicate(timeout=WAIT)
    redone = [i for i, png in masks_in(out).items() if png != row4[i]]
    assert 0 < len(redone) < N
    run = last_run(out)
    assert run["counts"]["done"] == len(redone) and run["counts"]["not_run"] == N - len(redone)
    again = run_refine(data, out)  # no --overwrite: the directory is being made with these settings
    assert again.exit_code == 0, again.stderr
    assert last_run(out)["counts"]["done"] == N - len(redone) and last_run(out)["counts"]["skipped"] == len(redone)
    assert masks_in(out) == reference
