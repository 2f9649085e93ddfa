"""Orchestration of ``refine``: the work of one image in a worker, and the pool that runs them.

Workers receive a :class:`RefineJob` (small, picklable) and chunks of ids; each process opens
the HDF5 files itself, once, and returns one small :class:`ImageResult` per image. Nothing in
here prints: the CLI drives the progress bar and the summary from the results.
"""
from __future__ import annotations

import errno
import os
import secrets
import signal
import threading
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from ..core.dhr import refine
from ..errors import FileLevelError, InputError
from ..io.atomic import write_bytes_atomic
from ..io.contract import CamsFile, FeatsFile, check_id
from ..io.inputs import load_inputs
from ..io.masks import encode_mask
from ..params import DHRParams
from .parallel import chunked, map_chunks

DONE, FAILED = "done", "failed"
#: Warnings of one image kept in its notes (the rest are counted).
MAX_WARNING_NOTES = 3


def new_token() -> str:
    """A random name for one run's temporaries (letters and digits)."""
    return secrets.token_hex(6)


@dataclass(frozen=True)
class RefineJob:
    """What every worker needs to refine any image: paths and parameters, no open handles."""

    cams: Path
    feats: Path | None
    out: Path
    params: DHRParams
    background: int | None
    palette: tuple[int, ...]
    images_dir: Path | None = None
    base_dir: Path | None = None
    token: str = field(default_factory=new_token)  # in the names of this run's temporaries
    parent: int = field(default_factory=os.getpid)  # the process that drives the run


@dataclass
class ImageResult:
    """The outcome of one image, small enough to send back from a worker.

    ``fatal``: the failure concerns the output directory, not the image (a full disk, a
    directory that became unwritable): every further image would fail the same way.
    """

    image_id: str
    status: str
    reason: str = ""
    fatal: bool = False
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    restored: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# In the workers
# ----------------------------------------------------------------------------------------------
_OPEN: dict[tuple, tuple[CamsFile, FeatsFile | None]] = {}
_USES: dict[tuple, int] = {}
#: Images read through one pair of handles before they are reopened: HDF5 keeps metadata of
#: every group read for as long as a file is open (~30 KB an image, measured), so a worker's
#: memory would grow with the dataset; reopening costs about a millisecond.
REOPEN_EVERY = 256


def _files(job: RefineJob) -> tuple[CamsFile, FeatsFile | None]:
    """The job's files, opened once per process (h5py handles must not cross a fork) and
    reopened every :data:`REOPEN_EVERY` images."""
    key = (job.cams, job.feats, os.getpid())
    if key in _OPEN and _USES[key] >= REOPEN_EVERY:
        for handle in _OPEN.pop(key):
            if handle is not None:
                handle.close()
    _USES[key] = _USES.get(key, 0) % REOPEN_EVERY + 1
    if key not in _OPEN:
        for old in list(_OPEN):
            if old[2] != os.getpid():
                del _OPEN[old]  # inherited through a fork: never use, never close
        cams = CamsFile.open(job.cams, combined=job.feats == job.cams)
        feats = None
        if job.feats is not None and job.params.steps.init and job.params.steps.rebalance:
            feats = FeatsFile.open(job.feats, combined=job.feats == job.cams)
        _OPEN[key] = (cams, feats)
    return _OPEN[key]


def refine_one(job: RefineJob, image_id: str) -> ImageResult:
    """Refine one image and write its mask; every failure becomes the result's reason.

    Warnings raised on the way (e.g. an OT that did not converge) become notes of the image
    instead of lines on the console. A failure to write the mask is ``fatal``.
    """
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_id(image_id, str(job.cams))
            cams, feats = _files(job)
            t0 = time.perf_counter()
            inputs = load_inputs(
                image_id, cams, feats, steps=job.params.steps, images_dir=job.images_dir, base_dir=job.base_dir
            )
            t1 = time.perf_counter()
            result = refine(
                inputs.cam,
                inputs.labels,
                image=inputs.image,
                base=inputs.base,
                uss=inputs.uss,
                wss=inputs.wss,
                background=job.background,
                params=job.params,
            )
            data = encode_mask(result.mask, job.palette)
    except InputError as exc:
        return ImageResult(image_id, FAILED, f"{exc.source}: {exc.problem}", seconds=time.perf_counter() - start)
    except FileLevelError as exc:
        return ImageResult(image_id, FAILED, str(exc), seconds=time.perf_counter() - start)
    except OSError as exc:
        where = exc.filename or job.cams
        return ImageResult(
            image_id, FAILED, f"{where}: {exc.strerror or exc}", seconds=time.perf_counter() - start
        )
    except Exception as exc:  # noqa: BLE001 - one bad image must not stop the run
        last = traceback.extract_tb(exc.__traceback__)[-1]
        return ImageResult(
            image_id,
            FAILED,
            f"internal error {type(exc).__name__}: {exc} (at {Path(last.filename).name}:{last.lineno})",
            seconds=time.perf_counter() - start,
        )
    t2 = time.perf_counter()
    target = job.out / f"{image_id}.png"
    try:
        write_bytes_atomic(target, data, tag=job.token)
    except OSError as exc:
        # A name too long is this image's problem; anything else is the directory's.
        fatal = exc.errno != errno.ENAMETOOLONG
        return ImageResult(
            image_id, FAILED, f"cannot write {target}: {exc.strerror or exc}", fatal=fatal,
            seconds=time.perf_counter() - start,
        )
    t3 = time.perf_counter()
    timings = {"read": t1 - t0, **result.timings, "write": t3 - t2}
    return ImageResult(
        image_id,
        DONE,
        notes=inputs.notes + _warning_notes(caught),
        seconds=time.perf_counter() - start,
        timings=timings,
        restored=result.restored,
    )


def _warning_notes(caught: list[warnings.WarningMessage]) -> list[str]:
    """The distinct warnings of one image as notes, at most :data:`MAX_WARNING_NOTES`."""
    seen: list[str] = []
    for item in caught:
        text = f"{item.category.__name__}: {item.message}"
        if text not in seen:
            seen.append(text)
    notes = seen[:MAX_WARNING_NOTES]
    if len(seen) > MAX_WARNING_NOTES:
        notes.append(f"... and {len(seen) - MAX_WARNING_NOTES} more warning(s)")
    return notes


def refine_chunk(job: RefineJob, ids: list[str]) -> list[ImageResult]:
    """Refine a chunk of ids (a worker's task)."""
    _leave_ctrl_c_to_the_parent(job)
    return [refine_one(job, image_id) for image_id in ids]


def _leave_ctrl_c_to_the_parent(job: RefineJob) -> None:
    """In a worker process, ignore SIGINT: a terminal's Ctrl-C reaches the whole process group,
    and the parent alone stops the pool, counts what was written and removes temporaries
    (a worker interrupted on its own only prints a traceback)."""
    if os.getpid() != job.parent and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


# ----------------------------------------------------------------------------------------------
# In the parent
# ----------------------------------------------------------------------------------------------
def run_images(job: RefineJob, ids: list[str], *, workers: int, on_result=None, backend: str = "loky", client=None):
    """Refine ``ids`` over ``workers`` processes; yield every :class:`ImageResult` as it ends.

    ``on_result(result)`` is called in this process for every result (progress). Closing the
    generator early (``--strict``, Ctrl-C, a full disk) stops the workers: call its
    ``close()`` before relying on no worker writing any more.

    Chunks are small (one image in this process, a few per task in a pool) so that the
    progress bar moves and an interruption loses little work in flight.

    ``backend="dask"`` sends the chunks to the cluster of ``client`` (a connected
    ``distributed.Client``); ``workers`` is then the cluster's thread count, for chunking.
    """
    chunks = chunked(ids, workers=workers, max_size=1 if workers <= 1 else 8)
    task = partial(refine_chunk, job)
    results = map_chunks(task, chunks, workers=workers, backend=backend, client=client)
    try:
        for batch in results:
            for result in batch:
                if on_result is not None:
                    on_result(result)
                yield result
    finally:
        results.close()
