"""Orchestration of ``refine``: which ids to run, the workers, masks and the manifest.

Workers receive a :class:`RefineJob` (small, picklable) and chunks of ids; each process opens
the HDF5 files itself, once, and returns one small :class:`ImageResult` per image. Nothing in
here prints: the CLI drives the progress bar and the summary from the results.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import platform
import secrets
import signal
import sys
import threading
import time
import traceback
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from ..core.dhr import refine
from ..errors import FileLevelError, InputError
from ..io.atomic import remove_stale_temporaries, write_bytes_atomic
from ..io.contract import CamsFile, FeatsFile, check_id
from ..io.inputs import load_inputs
from ..io.masks import encode_mask
from ..params import DHRParams
from .parallel import chunked, map_chunks

DONE, FAILED = "done", "failed"
#: Held shared by every run writing into an output directory, exclusively by the one run
#: that removes temporaries: a run never deletes a temporary another run is still writing.
WRITERS_LOCK = ".dhr-label-writers.lock"
#: Seconds of tolerance on modification times (FAT stores them to 2 s).
MTIME_SLACK = 2.0
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


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (1-based): a deterministic, coordination-free partition."""

    index: int = 1
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> "Shard":
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"--shard must look like I/N (e.g. 3/8), got {text!r}") from None
        if not 1 <= index <= count:
            raise ValueError(f"--shard I/N needs 1 <= I <= N, got {text!r}")
        return cls(index, count)

    def owns(self, image_id: str) -> bool:
        """Whether ``image_id`` belongs to this shard: CRC-32 of the id, modulo the count.

        Depends on nothing but the id, so every shard agrees without talking to the others,
        whatever subset (``--ids``, ``--limit``) each was given.
        """
        return zlib.crc32(image_id.encode("utf-8")) % self.count == self.index - 1

    @property
    def tag(self) -> str:
        return "" if self.count == 1 else f".shard-{self.index}-of-{self.count}"


# ----------------------------------------------------------------------------------------------
# In the workers
# ----------------------------------------------------------------------------------------------
_OPEN: dict[tuple, tuple[CamsFile, FeatsFile | None]] = {}


def _files(job: RefineJob) -> tuple[CamsFile, FeatsFile | None]:
    """The job's files, opened once per process (h5py handles must not cross a fork)."""
    key = (job.cams, job.feats, os.getpid())
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
def select_ids(
    available: list[str],
    *,
    wanted: list[str] | None = None,
    shard: Shard = Shard(),
    limit: int | None = None,
) -> tuple[list[str], list[str]]:
    """The ids to run, in sorted order, and the wanted ids the cams file does not hold.

    ``wanted`` (an ``--ids`` list) restricts ``available``; then the shard keeps its own ids;
    then ``limit`` keeps the first ones.
    """
    missing: list[str] = []
    if wanted is not None:
        present = set(available)
        missing = [i for i in wanted if i not in present]
        ids = sorted(i for i in set(wanted) if i in present)
    else:
        ids = sorted(available)
    ids = [i for i in ids if shard.owns(i)]
    if limit is not None:
        ids = ids[:limit]
    return ids, missing


def prepare_output(out: Path) -> None:
    """Create ``out`` if needed and check that it is a writable directory.

    Temporaries are not touched here: another run may be writing them (see
    :func:`output_lock`).
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FileLevelError(f"cannot create the output directory {out}: {exc.strerror}") from None
    if not out.is_dir():
        raise FileLevelError(f"the output path {out} exists and is not a directory")
    if not os.access(out, os.W_OK | os.X_OK):
        raise FileLevelError(f"the output directory {out} is not writable")


def _open_lock(path: Path):
    try:
        return open(path, "a+")
    except OSError as exc:
        raise FileLevelError(f"cannot create the lock file {path}: {exc.strerror}") from None


def _flock(handle, operation: int, path: Path) -> bool:
    """``flock``; False when a non-blocking request meets a conflicting lock."""
    try:
        fcntl.flock(handle, operation)
    except BlockingIOError:
        return False
    except OSError as exc:
        raise FileLevelError(f"cannot lock {path} (does this file system support locks?): {exc.strerror}") from None
    return True


def _clean_if_alone(out: Path, writers, path: Path) -> int:
    """Remove every temporary in ``out`` if no other run holds the writers' lock."""
    if not _flock(writers, fcntl.LOCK_EX | fcntl.LOCK_NB, path):
        return 0
    try:
        return remove_stale_temporaries(out)
    finally:
        fcntl.flock(writers, fcntl.LOCK_UN)


@contextlib.contextmanager
def output_lock(out: Path, shard: Shard = Shard(), *, token: str | None = None):
    """Hold ``out`` for one run (per shard); refuse a second run of the same shard.

    Two locks, both released by the kernel when the process dies (SIGKILL included):

    - ``.dhr-label[.shard-I-of-N].lock``, exclusive: a second run of the same shard is
      refused with the pid and host of the first;
    - :data:`WRITERS_LOCK`, shared by every run writing into ``out`` (shards of one job on a
      cluster share the directory). Temporaries left by killed runs are removed only by a run
      that can take it exclusively, i.e. when no other run is writing.

    On exit the temporaries named with ``token`` (this run's, e.g. of workers stopped by
    Ctrl-C) are removed; the caller must have stopped its workers first.
    """
    path = out / f".dhr-label{shard.tag}.lock"
    handle = _open_lock(path)
    try:
        if not _flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB, path):
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise FileLevelError(
                f"another dhr-label run (pid {holder}) is writing to {out}"
                + (f" (shard {shard.index}/{shard.count})" if shard.count > 1 else "")
                + f"; wait for it to finish or use another --out (lock file {path})"
            )
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()} on {platform.node() or 'this host'}")
        handle.flush()
        writers_path = out / WRITERS_LOCK
        writers = _open_lock(writers_path)
        try:
            _clean_if_alone(out, writers, writers_path)
            _flock(writers, fcntl.LOCK_SH, writers_path)
            try:
                yield
            finally:
                if token:
                    remove_stale_temporaries(out, tag=token)
                fcntl.flock(writers, fcntl.LOCK_UN)
                _clean_if_alone(out, writers, writers_path)
        finally:
            writers.close()
    finally:
        handle.close()


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


class InterruptWatch:
    """Notice a Ctrl-C that Python swallowed.

    SIGINT raises ``KeyboardInterrupt`` wherever the main thread is; when that is a callback
    run by the garbage collector (frequent while joblib waits for results), Python prints
    "Exception ignored in ... KeyboardInterrupt" with a traceback and goes on as if nothing
    happened. Inside this context such an exception is kept quiet and remembered in
    :attr:`requested`, which the result loop checks to stop as for any Ctrl-C.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def _hook(self, unraisable) -> None:
        if issubclass(unraisable.exc_type, KeyboardInterrupt):
            self.requested = True
        else:
            self._previous(unraisable)

    def __enter__(self) -> "InterruptWatch":
        self._previous, sys.unraisablehook = sys.unraisablehook, self._hook
        return self

    def __exit__(self, *exc) -> None:
        sys.unraisablehook = self._previous


def finished_unreported(out: Path, ids: list[str], *, since: float | None = None) -> list[str]:
    """The ``ids`` whose mask exists in ``out``: after a run stopped early, the images its
    workers wrote without reporting back (masks are atomic, so existing means complete).

    ``since`` (a ``time.time()``): count only masks written from then on, for ``--overwrite``
    runs, where the previous run's mask of an image not yet redone also exists.
    """
    found = []
    for image_id in ids:
        try:
            written = (out / f"{image_id}.png").stat().st_mtime
        except OSError:
            continue
        if since is None or written >= since - MTIME_SLACK:
            found.append(image_id)
    return found
