"""The output directory of a run: created and checked, locked per shard, cleaned of the
temporaries of killed runs, and read back for what a stopped run finished."""
from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import sys
from pathlib import Path

from ..errors import FileLevelError
from ..io.atomic import remove_stale_temporaries
from .selection import Shard

#: Held shared by every run writing into an output directory, exclusively by the one run
#: that removes temporaries: a run never deletes a temporary another run is still writing.
WRITERS_LOCK = ".dhr-label-writers.lock"
#: Seconds of tolerance on modification times (FAT stores them to 2 s).
MTIME_SLACK = 2.0


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
