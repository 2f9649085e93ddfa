"""Atomic file writes: a file under its final name is always complete."""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

TMP_SUFFIX = ".dhr-tmp"
_UMASK = os.umask(0)
os.umask(_UMASK)
_TAG = re.compile(r"[A-Za-z0-9]*")


@contextlib.contextmanager
def atomic_path(final: Path, *, tag: str = ""):
    """Yield a temporary path beside ``final``; rename it to ``final`` on success.

    The temporary file lives in the same directory (so the rename is atomic), starts with a
    dot and ends in :data:`TMP_SUFFIX`; it is removed if the body raises (including
    ``KeyboardInterrupt`` and a full disk), so no partial file is ever left under any name.
    A process killed in the body leaves the temporary behind: :func:`remove_stale_temporaries`
    removes it later. ``tag`` (letters and digits) is written into the temporary's name so
    that one run can find and remove its own temporaries while others are writing.
    """
    if not _TAG.fullmatch(tag):
        raise ValueError(f"tag must hold only letters and digits, got {tag!r}")
    final = Path(final)
    prefix = f".{final.name}.{tag}-" if tag else f".{final.name}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=TMP_SUFFIX, dir=final.parent)
    tmp_path = Path(tmp)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
        os.close(fd)
        yield tmp_path
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and flush it to the disk before the caller renames it.

    Without the fsync a crash of the machine (not just of the process) can leave a renamed,
    empty file behind, and "the file exists" would no longer mean "the file is complete".
    """
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_bytes_atomic(final: Path, data: bytes, *, tag: str = "") -> None:
    """Write ``data`` to ``final`` atomically (see :func:`atomic_path` for ``tag``)."""
    with atomic_path(final, tag=tag) as tmp:
        _write_file(tmp, data)


def remove_stale_temporaries(directory: Path, *, tag: str | None = None) -> int:
    """Delete temporaries of :func:`atomic_path` in ``directory``; return how many.

    ``tag=None`` removes every temporary (call it only when no other writer is active);
    a tag removes only the temporaries written with that tag.
    """
    pattern = f".*{TMP_SUFFIX}" if tag is None else f".*.{tag}-*{TMP_SUFFIX}"
    removed = 0
    for stale in Path(directory).glob(pattern):
        with contextlib.suppress(OSError):
            stale.unlink()
            removed += 1
    return removed
