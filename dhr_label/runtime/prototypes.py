"""The class prototypes of a run (ours; :mod:`dhr_label.core.prototypes`, docs/algorithm.md).

Pooled before the run from the base masks of every image of the cams file: the base masks are
inputs, so the pass needs no Step 1 and no CRF, only one read of each image's features. Every
id counts, not only those a run selects, so a mask does not depend on ``--ids``, ``--limit``
or ``--shard``. The ids go to the workers in chunks of a fixed size and the chunk sums are
added in the ids' order, so the float sums, and the masks, do not depend on the worker count.
The result is saved in the output directory beside the masks (``dhr-label-prototypes.npz``,
with the run's fingerprint id): a resumed run reads it instead of pooling again, and
``--prototypes FILE`` reuses it elsewhere (other shards, a val split with a train split's).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import platform
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from ..core.prototypes import Prototypes, Sums, add_sums, finish, image_sums
from ..errors import DHRLabelError, FileLevelError
from ..io.atomic import write_bytes_atomic
from ..io.contract import CamsFile, FeatsFile, one_file
from ..io.inputs import load_pooling_inputs
from .parallel import map_chunks
from .signals import become_worker

#: The file a run saves its pooled prototypes in, in the output directory.
FILE_NAME = "dhr-label-prototypes.npz"
#: Ids per task: a fixed grouping, so the sums do not depend on the number of workers.
CHUNK = 16


@dataclass(frozen=True)
class PoolJob:
    """What a worker needs to pool a chunk of ids."""

    cams: Path
    feats: Path
    num_classes: int
    wss: bool  # also the WSS layers (full DHR)
    base_dir: Path | None = None
    parent: int = field(default_factory=os.getpid)
    host: str = field(default_factory=platform.node)


@dataclass(frozen=True)
class RunPrototypes:
    """The prototypes of a run and where they come from (for the manifest and the summary).

    ``prototypes`` is None when no image had a base mask to pool: Steps 2-3 then use each
    image's own centroids, and the run says so.
    """

    prototypes: Prototypes | None
    source: str  # "pooled", "reused" (this directory's file) or "file"
    file: str | None
    images: int = 0  # images pooled
    skipped: int = 0  # images not pooled: without a base mask, or whose inputs could not be read
    unreadable: int = 0  # of the skipped, those whose base mask or features could not be read
    seconds: float = 0.0  # spent pooling (0 when read from a file)

    @property
    def without_base(self) -> int:
        """Images skipped because they have no base mask to pool from."""
        return self.skipped - self.unreadable

    def record(self) -> dict:
        return {"source": self.source, "file": self.file, "images": self.images, "skipped": self.skipped,
                "unreadable": self.unreadable, "available": self.prototypes is not None, "seconds": round(self.seconds, 3)}


def pool_chunk(job: PoolJob, ids: list[str]) -> tuple[str, Sums | None, int, int]:
    """A worker's task: the summed :func:`~dhr_label.core.prototypes.image_sums` of the ids
    that have a base mask and readable features, in order; the first id (to restore the
    chunks' order), how many have no base mask and how many could not be read. A fault of an
    image is left to the refine run, which reports it."""
    become_worker(job.parent, job.host)
    combined = one_file(job.cams, job.feats)
    sums, without_base, unreadable = None, 0, 0
    with CamsFile.open(job.cams, combined=combined) as cams, FeatsFile.open(job.feats, combined=combined) as feats:
        for image_id in ids:
            try:
                base, uss, wss = load_pooling_inputs(image_id, cams, feats, wss=job.wss, base_dir=job.base_dir)
            except (DHRLabelError, OSError, ValueError):
                unreadable += 1
                continue
            if base is None:
                without_base += 1
                continue
            sums = add_sums(sums, image_sums(base, uss, wss, job.num_classes))
    return ids[0], sums, without_base, unreadable


def pool(job: PoolJob, *, workers: int) -> RunPrototypes:
    """Pool the prototypes of every id of ``job.cams`` over ``workers`` processes."""
    t0 = time.perf_counter()
    with CamsFile.open(job.cams, combined=one_file(job.cams, job.feats)) as cams:
        ids = cams.ids()
    chunks = [ids[i : i + CHUNK] for i in range(0, len(ids), CHUNK)]
    parts = {first: rest for first, *rest in map_chunks(partial(pool_chunk, job), chunks, workers=workers)}
    total, without_base, unreadable = None, 0, 0
    for chunk in chunks:  # in the ids' order, whatever order the workers finished in
        sums, no_base, bad = parts[chunk[0]]
        total, without_base, unreadable = add_sums(total, sums), without_base + no_base, unreadable + bad
    prototypes = finish(total) if total is not None else None
    skipped = without_base + unreadable
    return RunPrototypes(prototypes, "pooled", None, len(ids) - skipped, skipped, unreadable, time.perf_counter() - t0)


def save(path: Path, run: RunPrototypes, *, fingerprint_id: str) -> None:
    """Write the prototypes as an ``.npz`` (``uss``, ``wss_0``, ...; ``meta`` JSON), atomically."""
    p = run.prototypes
    arrays = {"uss": p.uss, **{f"wss_{k}": layer for k, layer in enumerate(p.wss)}}
    meta = {"fingerprint_id": fingerprint_id, "images": run.images, "skipped": run.skipped, "unreadable": run.unreadable}
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(json.dumps(meta)), **arrays)
    try:
        write_bytes_atomic(Path(path), buffer.getvalue())
    except OSError as exc:  # a full disk stops the run before any image, as a mask write would
        raise FileLevelError(f"cannot write {path}: {exc.strerror or exc}") from None


def load(path: Path, *, num_classes: int, wss: bool) -> tuple[Prototypes, dict]:
    """Read a file of :func:`save` and its meta; its classes must be ``num_classes``, and it
    must hold WSS layers when ``wss``.

    Raises FileLevelError naming the file, what was expected and what was found.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            layers = sorted((n for n in z.files if n.startswith("wss_")), key=lambda n: int(n[4:]))
            prototypes = Prototypes(uss=z["uss"], wss=tuple(z[n] for n in layers))
            meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise FileLevelError(f"prototypes {path}: cannot read a dhr-label prototypes file ({exc})") from None
    if prototypes.num_classes != num_classes:
        raise FileLevelError(f"prototypes {path}: expected {num_classes} classes (the cams file's), found {prototypes.num_classes}")
    if wss and not prototypes.wss:
        raise FileLevelError(f"prototypes {path}: expected WSS layers for full DHR, found USS prototypes only")
    return prototypes, meta


def from_file(path: Path, *, num_classes: int, wss: bool) -> RunPrototypes:
    """The prototypes of ``--prototypes FILE`` (:func:`load`'s checks and errors)."""
    prototypes, meta = load(path, num_classes=num_classes, wss=wss)
    return RunPrototypes(prototypes, "file", str(path), *_counts(meta))


def for_run(job: PoolJob, *, out: Path, fingerprint_id: str, workers: int) -> RunPrototypes:
    """The prototypes of a run writing into ``out``: this directory's file when a run with the
    same fingerprint saved it; else pooled now and saved there."""
    saved = Path(out) / FILE_NAME
    if saved.exists():
        try:
            prototypes, meta = load(saved, num_classes=job.num_classes, wss=job.wss)
        except FileLevelError:
            meta = {}
        if meta.get("fingerprint_id") == fingerprint_id:
            return RunPrototypes(prototypes, "reused", str(saved), *_counts(meta))
    run = pool(job, workers=workers)
    if run.prototypes is not None:
        save(saved, run, fingerprint_id=fingerprint_id)
        run = dataclasses.replace(run, file=str(saved))
    return run


def _counts(meta: dict) -> tuple[int, int, int]:
    """``images, skipped, unreadable`` of a saved file's meta (0 where an older file has none)."""
    return tuple(int(meta.get(key, 0)) for key in ("images", "skipped", "unreadable"))
