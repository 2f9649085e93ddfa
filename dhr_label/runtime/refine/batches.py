"""The batches executor of ``refine`` (``--device cuda``; ``RefineRequest(executor="batches")`` on any device): the whole
of DHR on a device, many images at a time.

::

    reader processes ──inputs, in id order──► batches by pixel budget ──► loader thread: packs a
    (HDF5, PNG/JPEG decode,                    (the same ids, the same     batch into pinned memory,
     validation; joblib)                        batches, whatever the      one upload per dtype on a
                                                readers' speed)            side stream, while ...
                                                                              │
                        ... the device runs the previous batch (run_stages) ◄─┘
                                                  │ the masks: one download into pinned memory, an event
                                writer threads ◄──┘ (wait for the event, PNG encode, atomic write)

Readers work ahead of the device (joblib dispatches chunks ahead), the loader one batch ahead,
writers behind, so the device does not wait on the host. Batches are formed in id order from a
pixel budget, never from arrival times, so the masks do not depend on the number of readers.

A batch that fails is retried outside the handler of its error, after every reference to it
(its tensors, its traceback) is gone: out of device memory, in halves, down to one image; any
other error, image by image, so only the image at fault fails. An error that leaves the device
unusable for the process (a device-side assert, an illegal memory access: CUDA's sticky errors)
stops the run with one message instead of failing every image after it.
"""
from __future__ import annotations

import gc
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np

from ...errors import DHRLabelError
from ...io.inputs import ImageInputs
from ..outcomes import ImageResult, capped_notes, failure
from ..parallel import chunked, map_ordered
from .images import RefineJob, read_inputs

#: Default pixels per device batch (the sum of H x W): 4.2 M, ~24 CamVid-sized images. Raise it on
#: a large GPU (--batch-pixels); a batch that runs out of memory is halved anyway.
BATCH_PIXELS = 1 << 22
MAX_BATCH_IMAGES = 128
WRITERS = 4

#: CUDA's sticky errors (the context is unusable for the rest of the process), as torch words them.
STICKY_ERRORS = (
    "device-side assert", "illegal memory access", "illegal instruction", "misaligned address", "invalid program counter",
    "unspecified launch failure", "launch timed out", "uncorrectable ecc error", "hardware stack error",
    "operation not supported on global/shared address space",
)


class DeviceFailure(DHRLabelError):
    """The device can no longer run this process's work: the run stops (rerun to resume)."""


@dataclass
class _Item:
    image_id: str
    inputs: ImageInputs
    read: float  # seconds


def run_batches(
    job: RefineJob,
    ids: list[str],
    *,
    readers: int,
    device,
    batch_pixels: int = BATCH_PIXELS,
    max_images: int = MAX_BATCH_IMAGES,
    writers: int = WRITERS,
) -> Iterator[ImageResult]:
    """Refine ``ids`` in batches on ``device``; yield every image's result as it ends.

    ``readers`` processes read ahead (1: in this process). Closing the generator stops the
    readers and lets the writers finish the masks already computed. Raises
    :class:`DeviceFailure` when the device fails for good.
    """
    import torch

    torch_device = torch.device(device)
    chunks = chunked(ids, workers=readers, max_size=2)
    ahead = max(2 * readers, 2 * max(1, max_images // 2))
    inputs = map_ordered(partial(read_inputs, job), chunks, workers=readers, ahead=ahead)
    loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dhr-label-loader")
    pool = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="dhr-label-writer")
    writes: deque[Future] = deque()
    try:
        pending: Future | None = None
        for items, failures in _batches(inputs, batch_pixels, max_images):
            yield from failures
            loading = loader.submit(_upload, items, job, torch_device) if items else None
            if pending is not None:  # the device runs the previous batch while this one uploads
                yield from _run(pending, job, torch_device, pool, writes)
            pending = loading
            while writes and writes[0].done():
                yield writes.popleft().result()
        if pending is not None:
            yield from _run(pending, job, torch_device, pool, writes)
        while writes:
            yield writes.popleft().result()
    finally:
        inputs.close()
        loader.shutdown(wait=True, cancel_futures=True)
        pool.shutdown(wait=True, cancel_futures=True)


def _batches(inputs, batch_pixels: int, max_images: int) -> Iterator[tuple[list[_Item], list[ImageResult]]]:
    """Batches of items from the readers' chunks, by pixel budget in id order, and the failed
    reads met on the way (yielded with the next batch, or alone)."""
    batch: list[_Item] = []
    failures: list[ImageResult] = []
    pixels = 0
    for chunk in inputs:
        for image_id, read, failed, seconds in chunk:
            if failed is not None:
                failures.append(failed)
                continue
            size = int(np.prod(read.image.shape[:2]))
            if batch and (pixels + size > batch_pixels or len(batch) >= max_images):
                yield batch, failures
                batch, failures, pixels = [], [], 0
            batch.append(_Item(image_id, read, seconds))
            pixels += size
        if failures and not batch:
            yield [], failures
            failures = []
    if batch or failures:
        yield batch, failures


# --------------------------------------------------------------------------------------------
# Up to the device and back
# --------------------------------------------------------------------------------------------
@dataclass
class _Upload:
    """A batch's inputs on the device (arrays per item), and what marks their arrival.

    :meth:`take` hands the arrays over once: after it this object (which the loader's future
    keeps) holds none of the batch's memory.
    """

    items: list[_Item]
    arrays: list[dict] | None
    ready: object | None  # a CUDA event on the upload stream, or None

    def take(self) -> list[dict]:
        arrays, self.arrays = self.arrays, None
        return arrays


def _arrays(inputs: ImageInputs) -> dict:
    return {"cam": inputs.cam, "image": inputs.image, "base": inputs.base, "uss": inputs.uss,
            "wss": None if inputs.wss is None else list(inputs.wss)}


def _upload(items: list[_Item], job: RefineJob, device) -> _Upload:
    """The batch's arrays on ``device``: on a CPU the arrays themselves (no copy); on CUDA, per
    dtype, packed into one pinned buffer and copied up once, asynchronously, on a side stream
    (the loader's thread runs while the device works on the previous batch)."""
    import torch

    arrays = [_arrays(item.inputs) for item in items]
    if device.type != "cuda":  # the stages take the host arrays as they are
        return _Upload(items, arrays, None)
    flat = [(b, key, index, np.ascontiguousarray(array)) for b, a in enumerate(arrays) for key, value in a.items()
            for index, array in (enumerate(value) if isinstance(value, list) else [(None, value)]) if array is not None]
    uploaded = [{k: ([None] * len(v) if isinstance(v, list) else None) for k, v in a.items()} for a in arrays]
    stream = _upload_stream(device)
    for dtype in sorted({a.dtype.str for *_, a in flat}):
        members = [entry for entry in flat if entry[3].dtype.str == dtype]
        sizes = [a.size for *_, a in members]
        host = torch.empty(sum(sizes), dtype=torch.from_numpy(np.empty(0, dtype)).dtype, pin_memory=True)
        packed, offset = host.numpy(), 0  # a view of the pinned buffer (the arrays may be read-only)
        for (*_, array), size in zip(members, sizes):
            packed[offset : offset + size] = array.reshape(-1)
            offset += size
        with torch.cuda.stream(stream):
            on_device = host.to(device, non_blocking=True)
        offset = 0
        for (b, key, index, array), size in zip(members, sizes):
            view = on_device[offset : offset + size].view(array.shape)
            if index is None:
                uploaded[b][key] = view
            else:
                uploaded[b][key][index] = view
            offset += size
        on_device.record_stream(torch.cuda.current_stream(device))  # used on the main stream too
    ready = torch.cuda.Event()
    ready.record(stream)
    return _Upload(items, uploaded, ready)


_STREAMS: dict = {}


def _upload_stream(device):
    """The side stream uploads run on, one per device (created once)."""
    import torch

    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


def _download(states, device) -> tuple[object, list[tuple[int, tuple[int, int]]], object]:
    """Every mask of the batch in one host buffer (pinned, one copy, an event on CUDA); per mask
    its offset and shape. The writers wait for the event before they read."""
    import torch

    masks = [s.mask.reshape(-1) for s in states]
    flat = masks[0] if len(masks) == 1 else torch.cat(masks)
    places, offset = [], 0
    for s in states:
        places.append((offset, tuple(s.mask.shape)))
        offset += s.mask.numel()
    if device.type != "cuda":
        return flat.numpy(), places, None
    host = torch.empty(flat.numel(), dtype=torch.uint8, pin_memory=True)
    host.copy_(flat, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, places, done


def _write(job: RefineJob, item: _Item, host, place, done, *, started: float, notes, timings, restored) -> ImageResult:
    """A writer's task: wait for the masks' download, encode and write one mask."""
    if done is not None:
        done.synchronize()
    offset, shape = place
    mask = np.asarray(host[offset : offset + shape[0] * shape[1]]).reshape(shape)
    return job.target.finish(item.image_id, mask, started=started, notes=notes, timings=timings, restored=restored)


def _run(loading: Future, job: RefineJob, device, pool: ThreadPoolExecutor, writes: deque) -> Iterator[ImageResult]:
    """Run an uploaded batch, hand its masks to the writers; yield its failures at once."""
    upload: _Upload = loading.result()
    solved = _solve(upload.items, job, device, upload)
    share_of = {id(item): seconds for item, _, seconds in solved}
    done = [(item, state) for item, state, _ in solved if not isinstance(state, ImageResult)]
    for item, outcome, _ in solved:
        if isinstance(outcome, ImageResult):
            yield outcome
    if not done:
        return
    host, places, event = _download([state for _, state in done], device)
    now = time.perf_counter()
    for (item, state), place in zip(done, places):
        writes.append(pool.submit(
            _write, job, item, host, place, event, started=now - item.read - share_of[id(item)],
            notes=item.inputs.notes + capped_notes(state.warnings), timings={"read": item.read, **state.timings},
            restored=state.restored,
        ))


# --------------------------------------------------------------------------------------------
# Running a batch, and what to do when it fails
# --------------------------------------------------------------------------------------------
def _solve(items: list[_Item], job: RefineJob, device, upload: _Upload | None = None) -> list[tuple[_Item, object, float]]:
    """Run a batch; on failure retry as the module says. Per item: its state (or failed result)
    and its share of the device seconds."""
    t = time.perf_counter()
    kind, value = _attempt(items, job, device, upload)  # takes the upload's arrays: nothing of it stays here
    if kind == "done":
        share = (time.perf_counter() - t) / len(items)
        return [(item, state, share) for item, state in zip(items, value)]
    if kind == "sticky":
        raise DeviceFailure(
            f"the device failed while refining {items[0].image_id}" + (f" and {len(items) - 1} more" if len(items) > 1 else "")
            + f" ({value}); such an error leaves {device} unusable for this process, so the run stops here: the masks "
            "written so far are kept, and running the same command again resumes after them"
        )
    if kind == "out_of_memory":
        _free(device)
        if len(items) == 1:
            h, w = items[0].inputs.image.shape[:2]
            return [(items[0], failure(items[0].image_id, RuntimeError(
                f"the device ran out of memory for this image alone ({h} x {w} pixels, "
                f"{len(items[0].inputs.labels)} tags): {value}"), cams=job.cams), 0.0)]
        half = len(items) // 2
        return _solve(items[:half], job, device) + _solve(items[half:], job, device)
    if len(items) == 1:  # any other error, of this image alone
        return [(items[0], value, 0.0)]
    return [solved for item in items for solved in _solve([item], job, device)]


def _attempt(items: list[_Item], job: RefineJob, device, upload: _Upload | None) -> tuple[str, object]:
    """One try of a batch: ``("done", states)``, or what went wrong as plain values (never the
    exception: its traceback holds the batch's tensors, which a retry needs freed)."""
    import torch

    from ...core.pipeline import new_state, start  # here: readers import this module without torch
    from ...core.stages import run_stages

    out_of_memory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    try:
        upload = upload or _upload(items, job, device)
        if upload.ready is not None:
            torch.cuda.current_stream(device).wait_event(upload.ready)
        arrays, upload = upload.take(), None
        states = [start(new_state(a["cam"], item.inputs.labels, a["image"], a["base"], a["uss"], a["wss"], job.background,
                                  job.prototypes, device=device), job.params) for item, a in zip(items, arrays)]
        del arrays
        run_stages(states, job.params)
        return "done", states
    except out_of_memory as exc:
        return "out_of_memory", str(exc).splitlines()[0] if str(exc) else "out of memory"
    except Exception as exc:  # noqa: BLE001 - isolated below, or the run stopped
        if is_sticky(exc):
            return "sticky", str(exc).splitlines()[0]
        return "error", failure(items[0].image_id, exc, cams=job.cams) if len(items) == 1 else None


def is_sticky(exc: BaseException) -> bool:
    """Whether ``exc`` is one of CUDA's sticky errors (the context is lost for the process)."""
    text = str(exc).lower()
    return "cuda" in text and any(marker in text for marker in STICKY_ERRORS)


def _free(device) -> None:
    """Give the memory of a failed batch back: collect cycles, then empty the caching allocator."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
