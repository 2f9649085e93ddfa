"""The ``refine`` run: inputs checked, ids selected, the output directory locked and read, the
images refined by an executor, every outcome recorded in the ledger and the manifest.

The command line only parses its options into a :class:`RefineRequest`, calls
:func:`run_refine` and reports the :class:`RefineReport`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from ...errors import DHRLabelError, FileLevelError
from ...io.contract import CamsFile, FeatsFile, one_file
from ...io.ids import read_ids
from ...io.inputs import check_image_source
from ...io.manifest import describe_file, manifest_path, new_manifest, read_manifest, write_manifest
from ...params import CRFBackend, DHRParams
from ...presets import Preset, check_agreement, preset_from_classes
from ..ledger import RunLedger
from ..outcomes import FAILED, ImageResult, MaskTarget
from ..outdir import InterruptWatch, mask_stats, output_lock, prepare_output, written_since
from ..parallel import cluster_threads, dask_client, default_workers
from ..prototypes import PoolJob, RunPrototypes
from ..prototypes import for_run as prototypes_for_run
from ..prototypes import from_file as prototypes_from_file
from ..selection import Shard, select_ids
from ..signals import exit_code, stop_on_signals
from .batches import BATCH_PIXELS, run_batches
from .fingerprint import DirectoryState, differences, fingerprint, fingerprint_id, read_directory
from .images import RefineJob, new_token, run_images

#: The CRF backend of the CPU executor when the user does not choose: the faster one on a CPU,
#: as benchmarks/crf_speed.py measured it (README, Performance).
CPU_CRF_BACKEND = CRFBackend.pydensecrf


@dataclass(frozen=True)
class RefineRequest:
    """Everything a refine run is asked to do (what the command line parsed)."""

    cams: Path
    feats: Path | None
    out: Path
    params: DHRParams
    preset: Preset | None = None  # None: the classes of the cams file
    images: Path | None = None
    base: Path | None = None
    ids_file: Path | None = None
    limit: int | None = None
    shard: Shard = Shard()
    overwrite: bool = False
    allow_mixed: bool = False
    strict: bool = False
    workers: int | None = None  # None: every core (a Dask cluster has its own)
    device: str = "cpu"  # "cpu" or a torch CUDA device ("cuda", "cuda:1")
    executor: str | None = None  # "images" (per image) or "batches" (device); None: by device
    cluster: str = "local"  # "local" (processes on this machine) or "dask" (a Dask cluster, ``scheduler``)
    scheduler: str | None = None
    batch_pixels: int = BATCH_PIXELS
    prototypes: Path | None = None  # a prototypes file to use instead of pooling (ours)
    command: tuple[str, ...] = ()


@dataclass
class RefineReport:
    """How a refine run went."""

    out: Path
    manifest: Path | None
    counts: dict[str, int]
    seconds: float
    failures: list[dict]
    noted: int  # images with notes (in the manifest)
    interrupted: KeyboardInterrupt | None = None
    error: str | None = None  # why the run stopped before its end (a full disk, a dead worker)
    warnings: list[str] = field(default_factory=list)
    prototypes: RunPrototypes | None = None  # where Steps 2-3's class prototypes came from

    @property
    def exit_code(self) -> int:
        if self.interrupted is not None:
            return exit_code(self.interrupted)
        return 1 if self.error or self.counts["failed"] else 0


class MixedDirectory(DHRLabelError):
    """The output directory holds masks made with other settings, and the run would mix them."""


def run_refine(
    request: RefineRequest,
    *,
    on_start: Callable[[int, int], None] | None = None,
    on_result: Callable[[ImageResult], None] | None = None,
) -> RefineReport:
    """Run ``request``. ``on_start(todo, skipped)`` once the work is known, ``on_result`` per image.

    Raises :class:`~dhr_label.errors.DHRLabelError` for what stops the run before any image
    (a missing file, a locked or mixed output directory); everything after is in the report.
    """
    r, params = absolute_paths(request), request.params
    combined = one_file(r.cams, r.feats)
    with CamsFile.open(r.cams, combined=combined) as cams_file:
        preset = r.preset or preset_from_classes(cams_file.classes, cams_file.background)
        check_agreement(preset, cams_file.classes, cams_file.background, str(r.cams))
        available = cams_file.require_images()
        selected, unknown = select_ids(available, wanted=read_ids(r.ids_file) if r.ids_file else None, shard=r.shard,
                                       limit=r.limit)
        if unknown:
            shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise FileLevelError(f"{len(unknown)} id(s) of {r.ids_file} are not in {r.cams}: {shown}")
        check_image_source(cams_file, selected, r.images)
    if params.steps.needs_features:
        # A file-level fault of feats.h5 stops the run here; an id missing from it fails that
        # image alone, in its worker, like any other missing dataset.
        with FeatsFile.open(r.feats, combined=combined) as feats_file:
            feats_file.require_images()
    given = None  # --prototypes, read here: a bad file stops the run before any image
    if params.uses_prototypes and r.prototypes is not None:
        given = prototypes_from_file(r.prototypes, num_classes=len(preset.classes), wss=params.steps.needs_wss)
    device = "cuda" if r.device.startswith("cuda") else "cpu"
    fp = fingerprint(params=params, preset=preset, cams=r.cams, feats=r.feats, images=r.images, base=r.base, device=device,
                     prototypes=r.prototypes)
    fid = fingerprint_id(fp)
    # A Dask cluster is reached before anything is written or pooled: a wrong address stops the
    # run here, with nothing in --out.
    with _cluster(r) as client:
        prepare_output(r.out)
        target = MaskTarget(r.out, preset.palette, new_token(), fid)
        job = RefineJob(r.cams, r.feats if params.steps.needs_features else None, params, preset.background, target, r.images,
                        r.base)
        about = f"refine, settings {fid}, shard {r.shard.index}/{r.shard.count}, started {time.strftime('%Y-%m-%d %H:%M:%S')}"
        with output_lock(r.out, group=f"{fid}/{r.shard.count}", shard=r.shard, token=target.token, run=about):
            directory = read_directory(r.out)
            todo, foreign_left = plan(selected, directory, fid, fp, out=r.out, overwrite=r.overwrite, allow_mixed=r.allow_mixed)
            kept = set(selected) - set(todo)
            ledger = RunLedger(selected=len(selected), skipped=len(kept),
                               skipped_other_settings=sum(directory.provenance.get(i) != fid for i in kept))
            before = mask_stats(r.out, todo)
            path = manifest_path(r.out, r.shard.tag)
            manifest = _manifest(path, fp, fid, preset, params, r.shard)
            record = _about(r, fid, foreign_left)
            _write(path, manifest, ledger.record_dict(status="running", **record))
            interrupted, error, protos = None, None, None
            try:
                with stop_on_signals(), InterruptWatch() as watch:
                    if params.uses_prototypes and todo:
                        protos = given or _pooled_prototypes(r, preset, fid)
                        record["prototypes"] = protos.record()
                        job = dataclasses.replace(job, prototypes=protos.prototypes)
                    with _engine(r, job, client) as (run, workers):
                        record["engine"]["workers"] = workers
                        if on_start is not None:
                            on_start(len(todo), ledger.skipped)
                        error = _drive(run(todo), ledger, watch, strict=r.strict, on_result=on_result)
            except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM, SIGHUP
                interrupted = exc
            except DHRLabelError as exc:
                error = str(exc)
            except Exception as exc:  # noqa: BLE001 - a worker died (out of memory, a crash): report, keep the counts
                error = f"the run stopped: {type(exc).__name__}: {exc}"
            # Masks written by workers stopped before they could report (renamed into place: complete).
            ledger.add_unreported(written_since(r.out, [i for i in todo if i not in ledger.reported], before))
            status = "interrupted" if interrupted else "stopped" if error or (r.strict and ledger.failed) else "complete"
            record.update(status=status, interrupted=interrupted is not None, error=error,
                          strict_stop=bool(r.strict and ledger.failed))
            written = path
            try:
                _write(path, manifest, ledger.record_dict(**record), replace=True)
            except DHRLabelError as exc:  # the disk that stopped the masks stops the manifest too
                error, written = f"{error}; {exc}" if error else str(exc), None
    warnings = [f"{foreign_left} mask(s) in {r.out} were made with other settings and stay: the directory is mixed "
                "(the manifest records it)"] if foreign_left else []
    if protos is not None and protos.prototypes is None:
        warnings.append(f"--prototype-weight {params.prototype_weight}: no image of {r.cams} has a base mask to pool class "
                        "prototypes from, so Steps 2-3 used each image's own centroids (the paper's); give --prototypes FILE "
                        "or --prototype-weight 0 to say so")
    return RefineReport(r.out, written, ledger.counts(), ledger.seconds, sorted(ledger.failures, key=lambda f: f["id"]),
                        len(ledger.notes), interrupted, error, warnings, protos)


def _pooled_prototypes(r: RefineRequest, preset: Preset, fid: str) -> RunPrototypes:
    """Steps 2-3's class prototypes for this run (runtime.prototypes): this directory's file of
    an earlier run with these settings, or pooled now."""
    job = PoolJob(r.cams, r.feats, len(preset.classes), wss=r.params.steps.needs_wss, base_dir=r.base)
    return prototypes_for_run(job, out=r.out, fingerprint_id=fid, workers=r.workers or default_workers())


def _drive(results, ledger: RunLedger, watch: InterruptWatch, *, strict: bool, on_result) -> str | None:
    """Record every result; stop at a fatal one (the directory's: returned), or at the first
    failure with ``strict``. The workers are stopped before this returns, whatever happens."""
    try:
        for result in results:
            ledger.record(result)
            if on_result is not None:
                on_result(result)
            if watch.requested is not None:  # a Ctrl-C Python swallowed in a callback
                raise watch.requested
            if result.fatal:
                return result.reason
            if strict and result.status == FAILED:
                return None
    finally:
        results.close()  # stops the workers before output_lock removes temporaries
    return None


def plan(
    selected: list[str], directory: DirectoryState, mine: str, fp: dict, *, out: Path, overwrite: bool, allow_mixed: bool
) -> tuple[list[str], int]:
    """The ids to compute, and how many masks of other settings stay in the directory.

    Kept: a mask made with these settings (``mine``). Masks made otherwise (or by a run that
    recorded none) are recomputed with ``overwrite``, kept with ``allow_mixed``, recomputed
    when the directory's latest run had these settings (it was replacing them and stopped);
    else the run is refused, saying what differs.
    """
    existing = directory.provenance
    foreign = directory.foreign(mine)
    keep = allow_mixed or (directory.target == mine and bool(directory.latest.get("allow_mixed")))
    if overwrite:
        return list(selected), len(set(foreign) - set(selected))
    if foreign and not keep and directory.target != mine:
        recorded = directory.fingerprints.get(directory.target) or directory.fingerprints.get(existing[foreign[0]])
        changes = "; ".join(differences(recorded, fp)[:12])
        raise MixedDirectory(
            f"{out} holds {len(foreign)} mask(s) made with other settings ({directory.describe_foreign(mine)}): this run "
            f"would mix them with masks of its own. What differs (the directory's -> this run's): "
            f"{changes}. Use --overwrite to recompute them with these settings, --allow-mixed to keep them beside the "
            "new masks, or another --out"
        )
    if keep:
        todo = [i for i in selected if i not in existing]
        return todo, len(foreign)
    todo = [i for i in selected if existing.get(i, "") != mine or i not in existing]
    return todo, len(set(foreign) - set(selected))


def _about(r: RefineRequest, fid: str, foreign_left: int) -> dict:
    """The parts of the run record known before the run."""
    return {
        "command": list(r.command) or ["refine"],
        "fingerprint_id": fid,
        "overwrite": r.overwrite,
        "allow_mixed": r.allow_mixed,
        "inputs": {"cams": describe_file(r.cams), "feats": describe_file(r.feats if r.params.steps.needs_features else None),
                   "images": describe_file(r.images), "base": describe_file(r.base), "ids": describe_file(r.ids_file)},
        "selection": {"limit": r.limit, "shard": {"index": r.shard.index, "count": r.shard.count}},
        "engine": {"device": r.device, "executor": _executor(r), "cluster": r.cluster, "scheduler": r.scheduler,
                   "crf_backend": r.params.crf.backend.value, "crf_kernels": _kernels(r.params), "workers": r.workers},
        "foreign_masks_left": foreign_left,
    }


def _kernels(params: DHRParams) -> str | None:
    """How the torch CRF computes (None for pydensecrf); ``auto`` when the caller left it to
    the executor (the command line resolves it per device)."""
    return params.crf.kernels.value if params.crf.backend is CRFBackend.torch else None


def _executor(r: RefineRequest) -> str:
    return r.executor or ("batches" if r.device.startswith("cuda") else "images")


def _manifest(path: Path, fp: dict, fid: str, preset: Preset, params: DHRParams, shard: Shard) -> dict:
    """This shard's manifest with its history, its header now saying what this run makes."""
    header = new_manifest("refine", {"index": shard.index, "count": shard.count}, fid, fp,
                          {"name": preset.name, "classes": list(preset.classes), "background": preset.background}, params.to_dict())
    if not path.exists():
        return header
    try:
        manifest = read_manifest(path)
    except (OSError, ValueError) as exc:
        raise FileLevelError(f"cannot read the manifest {path}: {exc}; move it away to start a new history") from None
    return {**header, "runs": manifest.get("runs", [])}


def _write(path: Path, manifest: dict, record: dict, *, replace: bool = False) -> None:
    if replace:
        manifest["runs"][-1] = record
    else:
        manifest["runs"].append(record)
    try:
        write_manifest(path, manifest)
    except OSError as exc:
        raise FileLevelError(f"cannot write the manifest {path}: {exc.strerror or exc}") from None


def absolute_paths(request: RefineRequest) -> RefineRequest:
    """``request`` with every path absolute: the workers of a Dask cluster (and the run's own
    worker processes) may start in another directory, where a relative path names nothing."""
    paths = ("cams", "feats", "out", "images", "base", "ids_file", "prototypes")
    return dataclasses.replace(request, **{name: Path(os.path.abspath(getattr(request, name)))
                                           for name in paths if getattr(request, name) is not None})


@contextlib.contextmanager
def _cluster(r: RefineRequest):
    """The connected Dask client of ``--cluster dask`` for the block (None for local)."""
    if r.cluster != "dask":
        yield None
        return
    with dask_client(r.scheduler) as client:
        yield client


@contextlib.contextmanager
def _engine(r: RefineRequest, job: RefineJob, client):
    """``(run, workers)``: ``run(ids)`` yields every image's result; with a Dask ``client``
    (:func:`_cluster`), its cluster's threads are the worker count."""
    if client is not None:
        threads = cluster_threads(client)
        yield partial(run_images, job, workers=threads, cluster="dask", client=client), threads
        return
    workers = r.workers or default_workers()
    if _executor(r) == "batches":
        yield partial(run_batches, job, readers=workers, device=r.device, batch_pixels=r.batch_pixels), workers
        return
    yield partial(run_images, job, workers=workers), workers
