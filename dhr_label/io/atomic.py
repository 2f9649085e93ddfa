"""Atomic file writes: a file under its final name is always complete."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

TMP_SUFFIX = ".dhr-tmp"
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(final: Path):
    """Yield a temporary path beside ``final``; rename it to ``final`` on success.

    The temporary file lives in the same directory (so the rename is atomic), starts with a
    dot and ends in :data:`TMP_SUFFIX`; it is removed if the body raises (including
    ``KeyboardInterrupt`` and a full disk), so no partial file is ever left under any name.
    """
    final = Path(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=TMP_SUFFIX, dir=final.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def write_bytes_atomic(final: Path, data: bytes) -> None:
    """Write ``data`` to ``final`` atomically."""
    with atomic_path(final) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)


def remove_stale_temporaries(directory: Path) -> int:
    """Delete temporaries left by a killed run in ``directory``; return how many."""
    removed = 0
    for stale in Path(directory).glob(f".*{TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            stale.unlink()
            removed += 1
    return removed
