"""The images executor of ``refine`` (the CPU's; ``RefineRequest(executor="images")`` on any device): one image at a time per
worker process (or Dask worker), each a batch of one through the stages.

Workers receive a :class:`RefineJob` (small, picklable) and chunks of ids; each process opens
the HDF5 files itself and returns one small :class:`ImageResult` per image. Nothing in here
prints: the run drives the progress and the summary from the results.
"""
from __future__ import annotations

import ctypes
import os
import platform
import secrets
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from ...core.dhr import refine_image
from ...core.prototypes import Prototypes
from ...io.contract import CamsFile, FeatsFile, check_id, one_file
from ...io.inputs import ImageInputs, load_inputs
from ...params import CRFBackend, DHRParams
from ..outcomes import ImageResult, MaskTarget, failure, warning_notes
from ..parallel import chunked, map_chunks
from ..signals import become_worker


def new_token() -> str:
    """A random name for one run's temporaries (letters and digits)."""
    return secrets.token_hex(6)


@dataclass(frozen=True)
class RefineJob:
    """What every worker needs to refine any image: paths and parameters, no open handles."""

    cams: Path
    feats: Path | None
    params: DHRParams
    background: int | None
    target: MaskTarget
    images_dir: Path | None = None
    base_dir: Path | None = None
    prototypes: Prototypes | None = None  # dataset-level class prototypes for Steps 2-3 (ours)
    parent: int = field(default_factory=os.getpid)  # the process that drives the run
    host: str = field(default_factory=platform.node)  # and its host

    @property
    def combined(self) -> bool:
        """cams and feats are one file (docs/format.md)."""
        return one_file(self.cams, self.feats)


#: Images read through one pair of handles before they are reopened: HDF5 keeps metadata of
#: every group read for as long as a file is open (~30 KB an image, measured), so a worker's
#: memory would grow with the dataset; reopening costs about a millisecond.
REOPEN_EVERY = 256


class InputFiles:
    """A job's HDF5 files, opened once in this process and reopened every :data:`REOPEN_EVERY`
    images (h5py handles must not cross a fork: each process opens its own)."""

    def __init__(self, job: RefineJob):
        self.job, self.uses, self.handles, self.pid = job, 0, None, os.getpid()

    def read(self, image_id: str) -> ImageInputs:
        """The validated inputs of one image, as the job's steps need them."""
        job, steps = self.job, self.job.params.steps
        check_id(image_id, str(job.cams))
        if self.handles is not None and (self.uses >= REOPEN_EVERY or self.pid != os.getpid()):
            self.close()
        if self.handles is None:
            cams = CamsFile.open(job.cams, combined=job.combined)
            feats = FeatsFile.open(job.feats, combined=job.combined) if steps.needs_features else None
            self.handles, self.uses, self.pid = (cams, feats), 0, os.getpid()
        self.uses += 1
        cams, feats = self.handles
        return load_inputs(
            image_id, cams, feats, uss=steps.needs_uss, wss=steps.needs_wss, base_required=steps.needs_base,
            images_dir=job.images_dir, base_dir=job.base_dir,
        )

    def close(self) -> None:
        if self.handles is not None and self.pid == os.getpid():
            for handle in self.handles:
                if handle is not None:
                    handle.close()
        self.handles = None


_FILES: dict[tuple, InputFiles] = {}


def _files(job: RefineJob) -> InputFiles:
    key = (job.cams, job.feats, job.params.steps.needs_features)
    if key not in _FILES:
        _FILES[key] = InputFiles(job)
    return _FILES[key]


def make_mask(job: RefineJob, image_id: str) -> ImageResult:
    """Refine one image and write its mask; every failure becomes the result's reason.

    Warnings raised on the way (e.g. an OT that did not converge) become notes of the image
    instead of lines on the console. A failure to write the mask is ``fatal``.
    """
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            inputs = _files(job).read(image_id)
            read = time.perf_counter() - start
            done = refine_image(
                inputs.cam, inputs.labels, image=inputs.image, base=inputs.base, uss=inputs.uss, wss=inputs.wss,
                background=job.background, params=job.params, prototypes=job.prototypes,
            )
    except Exception as exc:  # noqa: BLE001 - one bad image must not stop the run
        return failure(image_id, exc, cams=job.cams, seconds=time.perf_counter() - start)
    return job.target.finish(
        image_id, done.mask, started=start, notes=inputs.notes + warning_notes(caught, done.warnings),
        timings={"read": read, **done.timings}, restored=done.restored,
    )


def make_masks(job: RefineJob, ids: list[str]) -> list[ImageResult]:
    """Refine a chunk of ids (a worker's task)."""
    become_worker(job.parent, job.host)
    results = []
    for image_id in ids:
        results.append(make_mask(job, image_id))
        if job.params.crf.backend is CRFBackend.torch:
            _trim_heap()
    return results


def _trim_heap() -> None:
    """Give the heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    The torch CRF allocates and frees a few hundred MB per image, which glibc keeps: a worker's
    resident memory then drifts 300 MB above its first image's and loky replaces it as leaking
    (a warning, and a worker start). Trimmed, it stays flat (measured: 269 MiB after every
    CamVid image).
    """
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def read_inputs(job: RefineJob, ids: list[str]) -> list[tuple[str, ImageInputs | None, ImageResult | None, float]]:
    """Read and validate the inputs of ``ids`` (a reader's task for the batches executor: here,
    so that readers never import torch); a failure per bad image."""
    become_worker(job.parent, job.host)
    files, out = _files(job), []
    for image_id in ids:
        t = time.perf_counter()
        try:
            out.append((image_id, files.read(image_id), None, time.perf_counter() - t))
        except Exception as exc:  # noqa: BLE001 - becomes that image's failure
            out.append((image_id, None, failure(image_id, exc, cams=job.cams, seconds=time.perf_counter() - t), 0.0))
    return out


def run_images(job: RefineJob, ids: list[str], *, workers: int, cluster: str = "local", client=None):
    """Refine ``ids`` over ``workers`` processes; yield every :class:`ImageResult` as it ends.

    Closing the generator early (``--strict``, Ctrl-C, a full disk) stops the workers: call
    its ``close()`` before relying on no worker writing any more. Chunks are small (one image
    in this process, a few per task in a pool) so that progress moves and an interruption
    loses little work in flight. ``cluster="dask"`` sends the chunks to the cluster of
    ``client`` (a connected ``distributed.Client``); ``workers`` is then its thread count.
    """
    chunks = chunked(ids, workers=workers, max_size=1 if workers <= 1 else 8)
    results = map_chunks(partial(make_masks, job), chunks, workers=workers, cluster=cluster, client=client)
    try:
        for batch in results:
            yield from batch
    finally:
        results.close()
