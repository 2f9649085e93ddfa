"""The device executor of ``refine --device cuda``: the whole of DHR on the GPU, in batches.

::

    reader processes ──inputs, in id order──► batches by pixel budget ──► run_batch on the
    (HDF5, PNG/JPEG decode,                    (deterministic: the same     device (both CRFs,
     validation; joblib)                        ids, the same batches)      every stage)
                                                        │
                                       writer threads ◄─┘ masks (PNG encode, atomic write)

Readers work ahead of the device (joblib dispatches ``pre_dispatch`` chunks ahead), writers
behind it, so the GPU does not wait on one reader. Batches are formed in id order from a pixel
budget, never from arrival times, so the masks do not depend on the number of readers. A batch
that fails is retried: out of device memory, in halves, down to one image; any other error,
image by image, so only the image at fault fails.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np

from ...io.inputs import ImageInputs
from ..outcomes import ImageResult, capped_notes, failure
from ..parallel import chunked, map_ordered
from .cpu import RefineJob, read_chunk

#: Default pixels per device batch (the sum of H x W): 4.2 M, ~24 CamVid-sized images. The torch
#: CRF needs ~1.5 KB a pixel at its peak (lattices, 11 labels; measured on the CPU: a 16.7 M-pixel
#: batch took 23 GB), so ~7 GB here; raise it on a large GPU (--batch-pixels), an out-of-memory
#: batch is halved anyway.
BATCH_PIXELS = 1 << 22
MAX_BATCH_IMAGES = 128
WRITERS = 4


@dataclass
class _Item:
    image_id: str
    inputs: ImageInputs
    read: float  # seconds


def run_images_on_device(
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
    readers and lets the writers finish the masks already computed.
    """
    import torch

    torch_device = torch.device(device)
    chunks = chunked(ids, workers=readers, max_size=2)
    ahead = max(2 * readers, 2 * max(1, max_images // 2))
    inputs = map_ordered(partial(read_chunk, job), chunks, workers=readers, ahead=ahead)
    pool = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="dhr-label-writer")
    writes: deque[Future] = deque()
    batch: list[_Item] = []
    pixels = 0
    try:
        for chunk in inputs:
            for image_id, read, failed, seconds in chunk:
                if failed is not None:
                    yield failed
                    continue
                size = int(np.prod(read.image.shape[:2]))
                if batch and (pixels + size > batch_pixels or len(batch) >= max_images):
                    yield from _submit(_solve(batch, job, torch_device), job, pool, writes)
                    batch, pixels = [], 0
                batch.append(_Item(image_id, read, seconds))
                pixels += size
            while writes and writes[0].done():
                yield writes.popleft().result()
        if batch:
            yield from _submit(_solve(batch, job, torch_device), job, pool, writes)
        while writes:
            yield writes.popleft().result()
    finally:
        inputs.close()
        pool.shutdown(wait=True, cancel_futures=True)


def _submit(solved, job: RefineJob, pool: ThreadPoolExecutor, writes: deque) -> Iterator[ImageResult]:
    """Hand every solved image to a writer; yield the failures at once."""
    now = time.perf_counter()
    for item, outcome, seconds in solved:
        if isinstance(outcome, ImageResult):
            yield outcome
            continue
        mask = outcome.mask.cpu().numpy()
        notes = item.inputs.notes + capped_notes(outcome.warnings)
        timings = {"read": item.read, **outcome.timings}
        writes.append(pool.submit(
            job.target.finish, item.image_id, mask, started=now - item.read - seconds,
            notes=notes, timings=timings, restored=outcome.restored,
        ))


def _solve(items: list[_Item], job: RefineJob, device) -> list[tuple[_Item, object, float]]:
    """Run a batch; on failure retry as the module says. Per item: its state (or failed
    result) and its share of the device seconds."""
    import torch

    from ...core.pipeline import start  # here: importing this module must not import torch (readers)
    from ...core.stages import run_stages

    out_of_memory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    t = time.perf_counter()
    try:
        states = [start(_state(item.inputs, job, device), job.params) for item in items]
        run_stages(states, job.params)
    except out_of_memory as exc:
        _free(device)
        if len(items) == 1:
            item = items[0]
            h, w = item.inputs.image.shape[:2]
            return [(item, failure(item.image_id, RuntimeError(
                f"the device ran out of memory for this image alone ({h} x {w} pixels, "
                f"{len(item.inputs.labels)} tags): {str(exc).splitlines()[0]}"), cams=job.cams), 0.0)]
        half = len(items) // 2
        return _solve(items[:half], job, device) + _solve(items[half:], job, device)
    except Exception as exc:  # noqa: BLE001 - isolate the image at fault
        if len(items) == 1:
            return [(items[0], failure(items[0].image_id, exc, cams=job.cams), 0.0)]
        return [solved for item in items for solved in _solve([item], job, device)]
    share = (time.perf_counter() - t) / len(items)
    return [(item, state, share) for item, state in zip(items, states)]


def _state(inputs: ImageInputs, job: RefineJob, device):
    from ...core.pipeline import new_state

    return new_state(inputs.cam, inputs.labels, inputs.image, inputs.base, inputs.uss, inputs.wss, job.background,
                     job.prototypes, device=device)


def _free(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
