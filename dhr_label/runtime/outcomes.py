"""The outcome of one image, the same for every executor (CPU workers, device batches, tune).

An image ends as an :class:`ImageResult`: done (its mask written) or failed (with a reason
naming the file, the dataset, what was expected and what was found). This module is the one
place that turns an exception into that reason, writes a mask, and turns warnings into notes.
"""
from __future__ import annotations

import errno
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import FileLevelError, InputError
from ..io.atomic import write_bytes_atomic
from ..io.masks import encode_mask

DONE, FAILED = "done", "failed"
#: Warning notes kept per image (the rest are counted in one more note).
MAX_WARNING_NOTES = 3


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


def failure(image_id: str, exc: BaseException, *, cams: Path, seconds: float = 0.0) -> ImageResult:
    """The failed result of an image whose processing raised ``exc``.

    An :class:`InputError` already names the file and dataset; an ``OSError`` names its file
    (or the cams file); anything else is an internal error, with where it happened.
    """
    if isinstance(exc, InputError):
        reason = f"{exc.source}: {exc.problem}"
    elif isinstance(exc, FileLevelError):
        reason = str(exc)
    elif isinstance(exc, OSError):
        reason = f"{exc.filename or cams}: {exc.strerror or exc}"
    else:
        last = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        where = f" (at {Path(last.filename).name}:{last.lineno})" if last else ""
        reason = f"internal error {type(exc).__name__}: {exc}{where}"
    return ImageResult(image_id, FAILED, reason, seconds=seconds)


@dataclass(frozen=True)
class MaskTarget:
    """Where and how a run writes its masks (small and picklable: it travels to workers).

    ``token`` names this run's temporaries; ``provenance`` (the run's fingerprint id) is stored
    in every PNG, so that a later run knows which settings made a mask.
    """

    out: Path
    palette: tuple[int, ...]
    token: str
    provenance: str

    def write(self, image_id: str, mask: np.ndarray) -> ImageResult | None:
        """Write ``<out>/<id>.png`` atomically; None on success, else the failed result.

        The failure is fatal (the directory's, not the image's) unless the name is too long.
        """
        target = self.out / f"{image_id}.png"
        try:
            write_bytes_atomic(target, encode_mask(mask, self.palette, provenance=self.provenance), tag=self.token)
        except OSError as exc:
            return ImageResult(
                image_id, FAILED, f"cannot write {target}: {exc.strerror or exc}", fatal=exc.errno != errno.ENAMETOOLONG
            )
        return None

    def finish(self, image_id: str, mask: np.ndarray, *, started: float, notes: list[str], timings: dict, restored: list[int]) -> ImageResult:
        """Write the mask of an image that went through; its result (done, or the write's failure)."""
        t = time.perf_counter()
        failed = self.write(image_id, mask)
        if failed is not None:
            failed.seconds = time.perf_counter() - started
            return failed
        timings = {**timings, "write": time.perf_counter() - t}
        return ImageResult(image_id, DONE, notes=notes, seconds=time.perf_counter() - started, timings=timings, restored=list(restored))


def capped_notes(texts: list[str]) -> list[str]:
    """The distinct ``texts``, at most :data:`MAX_WARNING_NOTES`, then a count of the rest."""
    seen: list[str] = []
    for text in texts:
        if text not in seen:
            seen.append(text)
    notes = seen[:MAX_WARNING_NOTES]
    if len(seen) > MAX_WARNING_NOTES:
        notes.append(f"... and {len(seen) - MAX_WARNING_NOTES} more warning(s)")
    return notes


def warning_notes(caught: list[warnings.WarningMessage], recorded: list[str] = ()) -> list[str]:
    """Warnings raised while an image ran and those its stages recorded (e.g. an OT that did
    not converge), as its notes."""
    return capped_notes([f"{w.category.__name__}: {w.message}" for w in caught] + list(recorded))
