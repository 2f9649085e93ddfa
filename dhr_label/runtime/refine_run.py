"""Orchestration of ``refine``: which ids to run, the workers, masks and the manifest.

Workers receive a :class:`RefineJob` (small, picklable) and chunks of ids; each process opens
the HDF5 files itself, once, and returns one small :class:`ImageResult` per image. Nothing in
here prints: the CLI drives the progress bar and the summary from the results.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import time
import traceback
import zlib
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from ..core.dhr import refine
from ..errors import FileLevelError, InputError
from ..io.atomic import remove_stale_temporaries
from ..io.contract import CamsFile, FeatsFile, check_id
from ..io.inputs import load_inputs
from ..io.masks import write_mask
from ..params import DHRParams
from .parallel import chunked, map_chunks

DONE, FAILED = "done", "failed"


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


@dataclass
class ImageResult:
    """The outcome of one image, small enough to send back from a worker."""

    image_id: str
    status: str
    reason: str = ""
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
    """Refine one image and write its mask; every failure becomes the result's reason."""
    start = time.perf_counter()
    try:
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
        t2 = time.perf_counter()
        write_mask(job.out / f"{image_id}.png", result.mask, job.palette)
        t3 = time.perf_counter()
    except InputError as exc:
        return ImageResult(image_id, FAILED, f"{exc.source}: {exc.problem}", seconds=time.perf_counter() - start)
    except FileLevelError as exc:
        return ImageResult(image_id, FAILED, str(exc), seconds=time.perf_counter() - start)
    except OSError as exc:
        where = exc.filename or job.out
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
    timings = {"read": t1 - t0, **result.timings, "write": t3 - t2}
    return ImageResult(
        image_id,
        DONE,
        notes=inputs.notes,
        seconds=time.perf_counter() - start,
        timings=timings,
        restored=result.restored,
    )


def refine_chunk(job: RefineJob, ids: list[str]) -> list[ImageResult]:
    """Refine a chunk of ids (a worker's task)."""
    return [refine_one(job, image_id) for image_id in ids]


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


def prepare_output(out: Path) -> int:
    """Create ``out`` if needed, check it is writable, remove a killed run's temporaries."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FileLevelError(f"cannot create the output directory {out}: {exc.strerror}") from None
    if not out.is_dir():
        raise FileLevelError(f"the output path {out} exists and is not a directory")
    if not os.access(out, os.W_OK | os.X_OK):
        raise FileLevelError(f"the output directory {out} is not writable")
    return remove_stale_temporaries(out)


@contextlib.contextmanager
def output_lock(out: Path, shard: Shard):
    """Hold an exclusive lock on ``out`` (per shard) for the run; refuse a concurrent run."""
    path = out / f".dhr-label{shard.tag}.lock"
    try:
        handle = open(path, "a+")
    except OSError as exc:
        raise FileLevelError(f"cannot create the lock file {path}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise FileLevelError(
                f"another dhr-label run (pid {holder}) is writing to {out}; wait for it or use another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()


def run_images(job: RefineJob, ids: list[str], *, workers: int, on_result=None):
    """Refine ``ids`` over ``workers`` processes; yield every :class:`ImageResult` as it ends.

    ``on_result(result)`` is called in this process for every result (progress). Closing the
    generator early (``--strict``, Ctrl-C) stops the workers.
    """
    chunks = chunked(ids, workers=workers)
    task = partial(refine_chunk, job)
    for results in map_chunks(task, chunks, workers=workers):
        for result in results:
            if on_result is not None:
                on_result(result)
            yield result
