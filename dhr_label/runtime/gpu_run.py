"""``refine --device cuda``: batches of images on a device while CPU processes run the CRFs.

Three kinds of worker, overlapped:

- a reader thread in this process reads and validates the inputs (HDF5, images) into a
  bounded queue;
- this process batches the non-CRF work on the device (core/batched.py): Step-1 OT for the
  images just read, Steps 2-3 heat maps for the images whose first CRF came back;
- CRF worker processes (spawned, one BLAS thread each) run the two DenseCRF passes of an
  image, integration and the mask write. An image stays with one worker for both passes, so
  the CRF lattice is built once (core/crf.py); each worker has its own inbox.

The parent never waits for a CRF while it has device work to do: it drains the results
without blocking, runs a device batch whenever inputs or first-pass results are waiting, and
keeps every worker's inbox ``depth`` images deep, so a worker finishing a pass always finds
the next one queued. It blocks only when all workers are full and nothing else is ready.
Masks are the CPU path's (same core functions on the CRF side; the device side agrees with
numpy to float32 rounding, tests/test_batched.py).
"""
from __future__ import annotations

import contextlib
import errno
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.crf import ImageCRF
from ..core.dhr import IGNORE, heat_mask, integrate, seed_mask
from ..errors import FileLevelError, InputError
from ..io.atomic import write_bytes_atomic
from ..io.contract import CamsFile, FeatsFile, check_id
from ..io.inputs import load_inputs
from .refine_run import DONE, FAILED, REOPEN_EVERY, ImageResult, RefineJob, run_images

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_POLL = 0.02  # seconds the parent sleeps on the result queue when nothing else is ready


# ----------------------------------------------------------------------------------------------
# Shared by the reader and the CRF workers
# ----------------------------------------------------------------------------------------------
def failure(image_id: str, exc: BaseException, job: RefineJob, start: float) -> ImageResult:
    """The result of an image that raised ``exc``, worded as :func:`refine_run.refine_one`."""
    seconds = time.perf_counter() - start
    if isinstance(exc, InputError):
        return ImageResult(image_id, FAILED, f"{exc.source}: {exc.problem}", seconds=seconds)
    if isinstance(exc, FileLevelError):
        return ImageResult(image_id, FAILED, str(exc), seconds=seconds)
    if isinstance(exc, OSError):
        return ImageResult(image_id, FAILED, f"{exc.filename or job.cams}: {exc.strerror or exc}", seconds=seconds)
    last = traceback.extract_tb(exc.__traceback__)[-1]
    return ImageResult(
        image_id, FAILED,
        f"internal error {type(exc).__name__}: {exc} (at {Path(last.filename).name}:{last.lineno})", seconds=seconds,
    )


def write_mask(job: RefineJob, image_id: str, mask: np.ndarray) -> ImageResult | None:
    """Write ``<out>/<id>.png`` atomically; a failure result (fatal unless the name is too long)."""
    from ..io.masks import encode_mask

    target = job.out / f"{image_id}.png"
    try:
        write_bytes_atomic(target, encode_mask(mask, job.palette), tag=job.token)
    except OSError as exc:
        return ImageResult(image_id, FAILED, f"cannot write {target}: {exc.strerror or exc}", fatal=exc.errno != errno.ENAMETOOLONG)
    return None


# ----------------------------------------------------------------------------------------------
# The CRF workers
# ----------------------------------------------------------------------------------------------
@dataclass
class _Held:
    """An image between its two CRF passes, in its worker."""

    crf: ImageCRF
    init: np.ndarray
    restored: list[int]
    timings: dict[str, float]
    start: float


def _crf_worker(job: RefineJob, inbox, outbox) -> None:
    """Serve ``("seed", ...)`` and ``("heat", ...)`` messages until ``None``.

    SIGINT is ignored: a terminal's Ctrl-C reaches the whole process group, and the parent
    alone stops the run (it terminates the workers, counts the masks written).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    held: dict[str, _Held] = {}
    while True:
        message = inbox.get()
        if message is None:
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reply = _HANDLERS[message[0]](job, held, *message[1:])
        if caught and reply[0] == "done":
            reply[1].notes.extend(f"{w.category.__name__}: {w.message}" for w in caught)
        outbox.put(reply)


def _seed(job: RefineJob, held: dict, image_id, scores, labels, image, base, background, rebalance):
    """Step 1.3-1.5 of one image; M_init back to the parent, or the mask when nothing follows.

    ``rebalance``: Steps 2-3 run for this image (switched on, and a feature grid of 2+ cells).
    """
    start = time.perf_counter()
    try:
        params = job.params
        crf = ImageCRF(image, params.crf)
        seed = seed_mask(scores, labels, background, params, crf)
        t1 = time.perf_counter()
        init, restored = integrate(seed, base, labels, params.rho)
        timings = {"crf1": t1 - start, "integrate": time.perf_counter() - t1}
        classes = np.unique(init[init != IGNORE]).astype(np.int64)
        if rebalance and len(classes) > 1:
            held[image_id] = _Held(crf, init, restored, timings, start)
            return ("init", image_id, init, classes)
        # Steps 2-3 off, one class or one cell: M_init is the result (as core.dhr.rebalance).
        return ("done", _written(job, image_id, init, restored, timings, start))
    except Exception as exc:  # noqa: BLE001 - one bad image must not stop the run
        return ("done", failure(image_id, exc, job, start))


def _heat(job: RefineJob, held: dict, image_id, heat, classes):
    """Step 3.5 of one image: upsample H, second CRF (same lattice), write the mask."""
    state = held.pop(image_id)
    start = time.perf_counter()
    try:
        mask = heat_mask(heat, classes, state.init, job.params, state.crf)
        state.timings["crf2"] = time.perf_counter() - start
        return ("done", _written(job, image_id, mask, state.restored, state.timings, state.start))
    except Exception as exc:  # noqa: BLE001
        return ("done", failure(image_id, exc, job, state.start))


def _drop(job: RefineJob, held: dict, image_id, result):
    """The parent could not compute this image's heat maps: release it, report ``result``."""
    held.pop(image_id, None)
    return ("done", result)


_HANDLERS = {"seed": _seed, "heat": _heat, "drop": _drop}


def _written(job, image_id, mask, restored, timings, start) -> ImageResult:
    t0 = time.perf_counter()
    failed = write_mask(job, image_id, mask)
    if failed is not None:
        failed.seconds = time.perf_counter() - start
        return failed
    timings["write"] = time.perf_counter() - t0
    return ImageResult(image_id, DONE, seconds=time.perf_counter() - start, timings=timings, restored=restored)


# ----------------------------------------------------------------------------------------------
# The reader thread
# ----------------------------------------------------------------------------------------------
class Reader:
    """Reads and validates the inputs of ``ids`` in a thread, ``size`` images ahead."""

    def __init__(self, job: RefineJob, ids: list[str], size: int):
        self.job, self.ids = job, ids
        self.queue: queue.Queue = queue.Queue(maxsize=size)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="dhr-label-reader", daemon=True)
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        job = self.job
        combined = job.feats == job.cams
        files: list = []
        try:
            for count, image_id in enumerate(self.ids):
                start = time.perf_counter()
                if files and count % REOPEN_EVERY == 0:  # bounded HDF5 metadata (refine_run)
                    for handle in files:
                        if handle is not None:
                            handle.close()
                    files = []
                try:
                    check_id(image_id, str(job.cams))
                    if not files:
                        files.append(CamsFile.open(job.cams, combined=combined))
                        needs_feats = job.feats is not None and job.params.steps.init and job.params.steps.rebalance
                        files.append(FeatsFile.open(job.feats, combined=combined) if needs_feats else None)
                    inputs = load_inputs(
                        image_id, files[0], files[1], steps=job.params.steps, images_dir=job.images_dir, base_dir=job.base_dir
                    )
                    item = (image_id, inputs, time.perf_counter() - start, None)
                except Exception as exc:  # noqa: BLE001 - becomes that image's failure
                    item = (image_id, None, 0.0, failure(image_id, exc, job, start))
                if not self._put(item):
                    return
        finally:
            for handle in files:
                if handle is not None:
                    handle.close()

    def take(self, count: int) -> list:
        """Up to ``count`` items that are ready now (never blocks)."""
        items = []
        while len(items) < count:
            try:
                items.append(self.queue.get_nowait())
            except queue.Empty:
                break
        return items

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


# ----------------------------------------------------------------------------------------------
# The parent
# ----------------------------------------------------------------------------------------------
@dataclass
class _InFlight:
    """What the parent keeps of an image its worker holds."""

    worker: int
    notes: list[str]
    timings: dict[str, float]
    uss: object = None  # device tensor
    wss: list = field(default_factory=list)  # device tensors


@contextlib.contextmanager
def _single_blas_thread_env():
    """The environment spawned workers inherit: one BLAS/OpenMP thread each."""
    saved = {name: os.environ.get(name) for name in THREAD_VARS}
    os.environ.update({name: "1" for name in THREAD_VARS})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_images_batched(
    job: RefineJob,
    ids: list[str],
    *,
    workers: int,
    device: str = "cuda",
    batch_size: int = 32,
    depth: int = 3,
    on_result=None,
) -> Iterator[ImageResult]:
    """Refine ``ids`` with the non-CRF work batched on ``device``; yield every result as it ends.

    ``workers`` CRF processes; each holds at most ``depth`` images (their CRF lattices) at a
    time. Closing the generator early stops the reader and the workers. With ``device="cpu"``
    the same code runs with torch on the CPU (tests). Table 6 row 1 (the base masks) has no
    device work: it runs on the CPU path.
    """
    if not job.params.steps.init:
        yield from run_images(job, ids, workers=workers, on_result=on_result)
        return
    import torch

    from ..core import batched

    torch_device = torch.device(device)
    threads = torch.get_num_threads()
    if torch_device.type == "cpu":
        torch.set_num_threads(1)  # the cores belong to the CRF workers
    context = mp.get_context("spawn")  # never fork a process that holds a CUDA context
    outbox = context.Queue()
    inboxes = [context.Queue() for _ in range(max(1, workers))]
    processes = [context.Process(target=_crf_worker, args=(job, inbox, outbox), daemon=True) for inbox in inboxes]
    with _single_blas_thread_env():
        for process in processes:
            process.start()
    reader = Reader(job, ids, size=2 * batch_size)
    load = [0] * len(processes)  # images each worker holds
    flight: dict[str, _InFlight] = {}
    returned: list[tuple[str, np.ndarray, np.ndarray]] = []  # first passes back, for Steps 2-3
    finished = 0
    steps = job.params.steps
    try:
        while finished < len(ids):
            ready: list[ImageResult] = []
            _drain(outbox, flight, load, returned, ready, block=False)
            busy = False
            if returned:  # Steps 2-3 for every image whose first CRF is back
                batch, returned = returned[:batch_size], returned[batch_size:]
                _stage_two(batched, batch, flight, inboxes, job, torch_device)
                busy = True
            free = len(processes) * depth - sum(load)
            if free > 0:
                items = reader.take(min(free, batch_size))
                good = []
                for image_id, inputs, seconds, failed in items:
                    if failed is not None:
                        ready.append(failed)
                    else:
                        good.append((image_id, inputs, seconds))
                if good:
                    _stage_one(batched, good, flight, load, inboxes, job, torch_device, steps.rebalance, ready)
                busy = busy or bool(items)
            for result in ready:
                finished += 1
                if on_result is not None:
                    on_result(result)
                yield result
            if not busy and not ready:
                _check_alive(processes)
                _drain(outbox, flight, load, returned, ready, block=True)
                for result in ready:
                    finished += 1
                    if on_result is not None:
                        on_result(result)
                    yield result
    finally:
        reader.close()
        _stop(processes, inboxes, wait=finished == len(ids))
        torch.set_num_threads(threads)


def _stage_one(batched, items, flight, load, inboxes, job, device, rebalance, ready) -> None:
    """Step 1.1-1.2 of a batch on the device; each image to the least loaded worker.

    A batch that fails (an image the device maths cannot take, the device out of memory) is
    retried image by image, so only the image at fault fails (into ``ready``).
    """
    start = time.perf_counter()
    inputs = [inp for _, inp, _ in items]
    try:
        scores, warned = batched.seed_scores(
            [i.cam for i in inputs], [i.labels for i in inputs], [i.base for i in inputs], job.params, device
        )
    except Exception as exc:  # noqa: BLE001 - one bad image must not stop the run
        if len(items) == 1:
            ready.append(failure(items[0][0], exc, job, start))
            return
        for item in items:
            _stage_one(batched, [item], flight, load, inboxes, job, device, rebalance, ready)
        return
    share = (time.perf_counter() - start) / len(items)
    for (image_id, inp, seconds), score, warning in zip(items, scores, warned):
        worker = int(np.argmin(load))
        load[worker] += 1
        state = _InFlight(worker, list(inp.notes) + ([warning] if warning else []), {"read": seconds, "step1_ot": share})
        if rebalance:
            state.uss = None if inp.uss is None else _to(device, inp.uss)
            state.wss = [] if inp.wss is None else [_to(device, layer) for layer in inp.wss]
        flight[image_id] = state
        inboxes[worker].put(("seed", image_id, score, inp.labels, inp.image, inp.base, job.background, rebalance and _cells(inp, job.params.steps) > 1))


def _stage_two(batched, batch, flight, inboxes, job, device) -> None:
    """Steps 2-3 (heat maps, WSS groups, OT) of a batch on the device; H to each image's worker."""
    start = time.perf_counter()
    states = [flight[image_id] for image_id, _, _ in batch]
    steps = job.params.steps
    try:
        out = batched.rebalance_heat(
            [init for _, init, _ in batch],
            [classes for _, _, classes in batch],
            [s.uss for s in states] if steps.uss else None,
            [s.wss for s in states] if steps.wss else None,
            job.params,
            device,
        )
    except Exception as exc:  # noqa: BLE001 - as in _stage_one: isolate the image at fault
        if len(batch) == 1:
            image_id = batch[0][0]
            inboxes[states[0].worker].put(("drop", image_id, failure(image_id, exc, job, start)))
            return
        for item in batch:
            _stage_two(batched, [item], flight, inboxes, job, device)
        return
    share = (time.perf_counter() - start) / len(batch)
    for (image_id, _, classes), state, heat, notes in zip(batch, states, out.heat, out.warnings):
        state.timings["heat_maps_ot"] = share
        state.notes.extend(notes)
        state.uss, state.wss = None, []  # the device memory is free again
        inboxes[state.worker].put(("heat", image_id, heat, classes))


def _cells(inputs, steps) -> int:
    """Cells of the grid Steps 2-3 work on (as core.dhr.rebalance: one cell keeps M_init)."""
    source = inputs.uss if steps.uss else inputs.wss[0]
    return source.shape[1] * source.shape[2]


def _to(device, array: np.ndarray):
    import torch

    return torch.as_tensor(array).to(device)


def _drain(outbox, flight, load, returned, ready, *, block: bool) -> None:
    """Move the workers' replies into ``returned`` (first passes) and ``ready`` (results)."""
    while True:
        try:
            message = outbox.get(timeout=_POLL) if block else outbox.get_nowait()
        except queue.Empty:
            return
        block = False
        if message[0] == "init":
            _, image_id, init, classes = message
            returned.append((image_id, init, classes))
            continue
        result: ImageResult = message[1]
        state = flight.pop(result.image_id)
        load[state.worker] -= 1
        if result.status == DONE:
            result.notes = state.notes + result.notes
            result.timings = {**state.timings, **result.timings}
            result.seconds += state.timings.get("read", 0.0) + state.timings.get("step1_ot", 0.0) + state.timings.get("heat_maps_ot", 0.0)
        ready.append(result)


def _check_alive(processes) -> None:
    for process in processes:
        if process.exitcode is not None:
            raise RuntimeError(f"a CRF worker process died (exit code {process.exitcode})")


def _stop(processes, inboxes, *, wait: bool) -> None:
    """Stop the workers: ask them when the run is complete (their inboxes are empty), else
    (Ctrl-C, --strict, an error) terminate them at once, mid-image; the caller then counts the
    masks they wrote and removes their temporaries."""
    if wait:
        for process, inbox in zip(processes, inboxes):
            if process.is_alive():
                with contextlib.suppress(Exception):
                    inbox.put(None)
        deadline = time.monotonic() + 5.0
        for process in processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.terminate()
        process.join(timeout=5.0)
    for inbox in inboxes:
        # Messages no worker will read must not hold this process at exit (the queue's
        # feeder thread would wait for a reader forever).
        inbox.cancel_join_thread()
        inbox.close()
