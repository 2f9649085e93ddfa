"""The output directory of a run: created and checked, locked, cleaned of the temporaries of
killed runs, and read back for what a stopped run finished."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import sys
from pathlib import Path

from ..errors import FileLevelError
from ..io.atomic import remove_stale_temporaries
from .selection import Shard

#: Held only while a run joins or leaves the directory (milliseconds): joining is one decision.
GATE = ".dhr-label.gate"
#: Held shared by every run writing into the directory; its content names the group of runs
#: allowed to share it (the shards of one split, with one fingerprint) and their holders.
DIRECTORY_LOCK = ".dhr-label.lock"


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


def check_writable(directory: Path, option: str) -> None:
    """Fail now, before any work, when ``directory`` (an output option) cannot be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FileLevelError(f"{option} {directory}: cannot create this directory: {exc.strerror or exc}") from None
    if not directory.is_dir():
        raise FileLevelError(f"{option} {directory}: exists and is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise FileLevelError(f"{option} {directory}: this directory is not writable")


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


def _read(handle) -> dict:
    handle.seek(0)
    try:
        content = json.loads(handle.read() or "{}")
    except ValueError:
        return {}
    return content if isinstance(content, dict) else {}


def _write(handle, content: dict) -> None:
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(content))
    handle.flush()


def _alive(holder: dict) -> bool:
    """Whether a holder recorded in the lock is still running (unknown on another host: yes)."""
    if holder.get("host") != platform.node():
        return True
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except (OSError, ValueError):
        return False
    return True


def _holders(content: dict) -> str:
    listed = [h for h in content.get("holders", []) if _alive(h)]
    return "; ".join(f"pid {h.get('pid')} on {h.get('host')}: {h.get('run')}" for h in listed) or "unknown"


@contextlib.contextmanager
def output_lock(out: Path, *, group: str, shard: Shard = Shard(), token: str | None = None, run: str = "a dhr-label run"):
    """Hold ``out`` for one run; refuse any concurrent run that is not of the same ``group``.

    ``group`` names the runs allowed to share the directory at once: the shards of one
    ``--shard */N`` split with the same fingerprint (e.g. ``"<fingerprint id>/N"``). Every
    other concurrent run is refused with the pid, host and ``run`` description of the holders,
    and so is a second run of the same shard. The locks are ``flock`` locks, released by the
    kernel when a process dies (SIGKILL included); temporaries left by killed runs are removed
    by the first run to enter an idle directory. On exit this run's own temporaries (named
    with ``token``) are removed: the caller must have stopped its workers first.
    """
    gate_path, dir_path = out / GATE, out / DIRECTORY_LOCK
    shard_path = out / f".dhr-label{shard.tag or '.run'}.lock"
    gate, directory, mine = _open_lock(gate_path), _open_lock(dir_path), _open_lock(shard_path)
    me = {"pid": os.getpid(), "host": platform.node(), "run": run, "shard": f"{shard.index}/{shard.count}"}
    try:
        with _gate(gate, gate_path):
            if not _flock(mine, fcntl.LOCK_EX | fcntl.LOCK_NB, shard_path):
                raise FileLevelError(
                    f"another dhr-label run ({_holders(_read(directory))}) is writing shard {shard.index}/{shard.count} "
                    f"of {out}; wait for it to finish or use another --out"
                )
            if _flock(directory, fcntl.LOCK_EX | fcntl.LOCK_NB, dir_path):  # no other run here
                remove_stale_temporaries(out)
                _write(directory, {"group": group, "holders": [me]})
                _flock(directory, fcntl.LOCK_SH, dir_path)  # shards of the group may join now
            else:
                content = _read(directory)
                if content.get("group") != group:
                    raise FileLevelError(
                        f"another dhr-label run ({_holders(content)}) is writing to {out}; only the shards of one "
                        f"--shard split with the same settings may share a directory: wait for it, or use another --out"
                    )
                _flock(directory, fcntl.LOCK_SH, dir_path)
                content["holders"] = [h for h in content.get("holders", []) if _alive(h)] + [me]
                _write(directory, content)
        try:
            yield
        finally:
            if token:
                remove_stale_temporaries(out, tag=token)
            with _gate(gate, gate_path):
                content = _read(directory)
                content["holders"] = [h for h in content.get("holders", []) if h.get("pid") != me["pid"] or h.get("host") != me["host"]]
                _write(directory, content)
    finally:
        for handle in (mine, directory, gate):
            handle.close()  # releases its locks


@contextlib.contextmanager
def _gate(handle, path: Path):
    _flock(handle, fcntl.LOCK_EX, path)
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)


class InterruptWatch:
    """Notice a Ctrl-C that Python swallowed.

    SIGINT raises ``KeyboardInterrupt`` wherever the main thread is; when that is a callback
    run by the garbage collector (frequent while joblib waits for results), Python prints
    "Exception ignored in ... KeyboardInterrupt" with a traceback and goes on as if nothing
    happened. Inside this context such an exception is kept quiet and remembered in
    :attr:`requested`, which the result loop checks to stop as for any Ctrl-C.
    """

    def __init__(self):
        self.requested: KeyboardInterrupt | None = None
        self._previous = None

    def _hook(self, unraisable) -> None:
        if issubclass(unraisable.exc_type, KeyboardInterrupt):
            self.requested = unraisable.exc_value or KeyboardInterrupt()
        else:
            self._previous(unraisable)

    def __enter__(self) -> "InterruptWatch":
        self._previous, sys.unraisablehook = sys.unraisablehook, self._hook
        return self

    def __exit__(self, *exc) -> None:
        sys.unraisablehook = self._previous


def mask_stats(out: Path, ids: list[str]) -> dict[str, tuple[int, int]]:
    """``{id: (inode, mtime_ns)}`` of the ``ids`` whose mask exists in ``out``."""
    found = {}
    for image_id in ids:
        try:
            stat = (out / f"{image_id}.png").stat()
        except OSError:
            continue
        found[image_id] = (stat.st_ino, stat.st_mtime_ns)
    return found


def written_since(out: Path, ids: list[str], before: dict[str, tuple[int, int]]) -> list[str]:
    """The ``ids`` whose mask was (re)written after ``before`` (:func:`mask_stats`) was taken.

    Masks are renamed into place, so a new mask is a new inode: after a run stopped early,
    these are the images its workers finished without reporting back; a mask of an earlier
    run that this one did not redo does not count.
    """
    after = mask_stats(out, ids)
    return [i for i in ids if i in after and after[i] != before.get(i)]
