"""``tune``'s engine: every setting of a grid on every labelled image, scored exactly, chosen by
k-fold cross-validation.

Per image (a worker's task): the inputs are read once; Step 1 runs once per distinct Step-1
setting and every Steps 2-3 variant continues from it (with the image's CRF lattice reused
while the CRF parameters agree); each variant's mask is scored against the ground truth (an
int64 confusion matrix and the vanished classes, as ``score`` counts them). The counts of all
variants go to ``<out>/images/<id>.npz`` (atomically), so a killed run resumes; the parent sums
them per fold and cross-validates (:mod:`dhr_label.metrics.crossval`).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import platform
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from ..core.pipeline import ImageState, Stage, new_state, resume, start, step1_settings
from ..core.prototypes import Prototypes
from ..core.stages import CRFCache, run_stages
from ..core.tensors import to_host
from ..errors import DHRLabelError, FileLevelError, InputError
from ..io.atomic import write_bytes_atomic
from ..io.contract import CamsFile, FeatsFile, check_id, one_file
from ..io.ids import mask_files, read_ids
from ..io.inputs import check_image_source, load_inputs
from ..io.masks import read_mask
from ..metrics import confusion_matrix, vanished_classes
from ..metrics.crossval import CrossValidation, Tally, assign_folds, cross_validate, scores, sum_tallies
from ..params import DHRParams
from ..presets import Preset, check_agreement, preset_from_classes
from .outcomes import DONE, FAILED, ImageResult, failure
from .parallel import chunked, default_workers, map_chunks
from .prototypes import PoolJob
from .prototypes import for_run as prototypes_for_run
from .refine.fingerprint import file_identity, fingerprint_id
from .signals import become_worker

STATE = "tune.json"
STATE_FORMAT = "dhr-label/tune"
PARAMS_FORMAT = "dhr-label/params"


@dataclass(frozen=True)
class TuneJob:
    """What a worker needs: paths, the settings to try, the classes."""

    cams: Path
    feats: Path | None
    gt: Path
    out: Path
    variants: tuple[DHRParams, ...]
    background: int | None
    num_classes: int
    images_dir: Path | None = None
    base_dir: Path | None = None
    prototypes: Prototypes | None = None  # for variants with a prototype_weight (ours)
    parent: int = field(default_factory=os.getpid)
    host: str = field(default_factory=platform.node)

    def needs(self, flag: str) -> bool:
        return any(getattr(v.steps, flag) for v in self.variants)


def tune_image(job: TuneJob, image_id: str) -> ImageResult:
    """Every variant on one image; its counts written to ``<out>/images/<id>.npz``."""
    t = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an OT that did not converge is scored like any mask
            counts = _variants(job, image_id)
    except Exception as exc:  # noqa: BLE001 - one bad image must not stop the run
        return failure(image_id, exc, cams=job.cams, seconds=time.perf_counter() - t)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **counts)
    write_bytes_atomic(job.out / "images" / f"{image_id}.npz", buffer.getvalue())
    return ImageResult(image_id, DONE, seconds=time.perf_counter() - t)


def _variants(job: TuneJob, image_id: str) -> dict[str, np.ndarray]:
    check_id(image_id, str(job.cams))
    gt_path = job.gt / f"{image_id}.png"
    combined = one_file(job.cams, job.feats)
    with CamsFile.open(job.cams, combined=combined) as cams:
        feats = FeatsFile.open(job.feats, combined=combined) if job.needs("needs_features") else None
        try:
            inputs = load_inputs(image_id, cams, feats, uss=job.needs("needs_uss"), wss=job.needs("needs_wss"),
                                 base_required=job.needs("needs_base"), images_dir=job.images_dir, base_dir=job.base_dir)
        finally:
            if feats is not None:
                feats.close()
    try:
        gt = read_mask(gt_path)
    except (OSError, ValueError) as exc:
        raise InputError(image_id, str(gt_path), f"cannot read the ground truth: {exc}") from None
    if gt.shape != inputs.image.shape[:2]:
        raise InputError(image_id, str(gt_path), f"expected the image's size {inputs.image.shape[:2]}, found {gt.shape}")
    v, c = len(job.variants), job.num_classes
    out = {"confusion": np.zeros((v, c, c + 1), np.int64), "eligible": np.zeros((v, c), bool), "vanished": np.zeros((v, c), bool)}
    seeds: dict[tuple, tuple[ImageState, CRFCache]] = {}
    fresh = new_state(inputs.cam, inputs.labels, inputs.image, inputs.base, inputs.uss, inputs.wss, job.background,
                      job.prototypes, device="cpu")
    for index, params in enumerate(job.variants):
        state = start(dataclasses.replace(fresh), params)
        if state.next is not None:
            key = step1_settings(params)
            if key not in seeds:  # Step 1 once per Step-1 setting (the key holds the CRF's too)
                crfs = CRFCache(params.crf)
                seeds[key] = (run_stages([state], params, crfs=crfs, until=Stage.HEAT_MAPS)[0], crfs)
            seeded, crfs = seeds[key]
            state = run_stages([resume(seeded, params)], params, crfs=crfs)[0]
        confusion = confusion_matrix(to_host(state.mask), gt, num_classes=c, ignore_index=255)
        out["confusion"][index] = confusion
        out["eligible"][index], out["vanished"][index] = vanished_classes(confusion)
    return out


def tune_chunk(job: TuneJob, ids: list[str]) -> list[ImageResult]:
    become_worker(job.parent, job.host)
    return [tune_image(job, image_id) for image_id in ids]


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TuneRequest:
    cams: Path
    feats: Path | None
    gt: Path
    out: Path
    variants: tuple[DHRParams, ...]
    settings: tuple[dict, ...]  # per variant, the values that vary (for the report)
    preset: Preset | None = None
    images: Path | None = None
    base: Path | None = None
    ids_file: Path | None = None
    workers: int | None = None
    folds: int = 2
    seed: int = 0
    objective: str = "miou"
    overwrite: bool = False


@dataclass
class TuneReport:
    preset: Preset
    settings: tuple[dict, ...]
    totals: list[dict]  # per variant, scores on every image
    cv: CrossValidation
    params: DHRParams  # the chosen setting
    images: int
    without_gt: list[str]
    failures: list[dict]
    fold_sizes: list[int]
    seconds: float


def _too_few(r: TuneRequest, ids: list[str], wanted: list[str], truth: dict) -> str:
    """Why fewer images than folds are left, naming the side that is really short."""
    what = f"the {len(wanted)} ids of {r.ids_file}" if r.ids_file else f"the {len(wanted)} images of {r.cams}"
    if not truth:
        return f"{r.gt} holds no <id>.png ground-truth mask"
    if not ids:
        return (f"none of {what} has a ground truth in {r.gt}: the ids differ (cams: {', '.join(sorted(wanted)[:3])}...; "
                f"ground truth: {', '.join(list(truth)[:3])}...); are they the same images, named the same way?")
    return f"only {len(ids)} of {what} have a ground truth in {r.gt}: too few for {r.folds}-fold cross-validation"


def run_tune(request: TuneRequest, *, on_start=None, on_result=None) -> TuneReport:
    """Run ``request``; write ``params.json`` and ``report.json`` into its ``out``."""
    r, t0 = request, time.perf_counter()
    combined = one_file(r.cams, r.feats)
    with CamsFile.open(r.cams, combined=combined) as cams:
        preset = r.preset or preset_from_classes(cams.classes, cams.background)
        check_agreement(preset, cams.classes, cams.background, str(r.cams))
        available = set(cams.require_images())
        truth = mask_files(r.gt)
        wanted = read_ids(r.ids_file) if r.ids_file else sorted(available)
        unknown = [i for i in wanted if i not in available]
        if unknown:
            raise FileLevelError(f"{len(unknown)} id(s) of {r.ids_file} are not in {r.cams}: {', '.join(unknown[:5])}")
        ids = sorted(i for i in wanted if i in truth)
        without_gt = sorted(i for i in wanted if i not in truth)
        if len(ids) < r.folds:
            raise FileLevelError(_too_few(r, ids, wanted, truth))
        check_image_source(cams, ids, r.images)
    job = TuneJob(r.cams, r.feats if any(v.steps.needs_features for v in r.variants) else None, r.gt, r.out, r.variants,
                  preset.background, preset.num_classes, r.images, r.base)
    _prepare(r, job)
    todo = [i for i in ids if not (r.out / "images" / f"{i}.npz").exists()]
    workers = r.workers or default_workers()
    if todo and any(v.uses_prototypes for v in r.variants):  # pooled once for every variant (runtime.prototypes)
        pool_job = PoolJob(r.cams, r.feats, preset.num_classes, wss=any(v.steps.needs_wss for v in r.variants),
                           base_dir=r.base)
        key = fingerprint_id({"inputs": _inputs(r, job), "classes": preset.num_classes, "wss": pool_job.wss})
        job = dataclasses.replace(job, prototypes=prototypes_for_run(pool_job, out=r.out, fingerprint_id=key, workers=workers).prototypes)
    if on_start is not None:
        on_start(len(todo), len(ids) - len(todo))
    failures = []
    results = map_chunks(partial(tune_chunk, job), chunked(todo, workers=workers, max_size=1 if workers <= 1 else 4), workers=workers)
    try:
        for chunk in results:
            for result in chunk:
                if result.status == FAILED:
                    failures.append({"id": result.image_id, "reason": result.reason})
                if on_result is not None:
                    on_result(result)
    finally:
        results.close()
    folds = assign_folds(ids, r.folds, r.seed)
    failed = {f["id"] for f in failures}
    tallies = [[Tally.empty(preset.num_classes) for _ in range(r.folds)] for _ in r.variants]
    for image_id in ids:
        if image_id in failed:
            continue
        with np.load(r.out / "images" / f"{image_id}.npz") as counts:
            for v in range(len(r.variants)):
                one = Tally(counts["confusion"][v], int(counts["vanished"][v].sum()), int(counts["eligible"][v].sum()), 1)
                tallies[v][folds[image_id]] = tallies[v][folds[image_id]].add(one)
    if failed:
        raise DHRLabelError(f"{len(failed)} of {len(ids)} images could not be tuned on (first: {failures[0]['id']}: "
                            f"{failures[0]['reason']}); fix them or leave them out with --ids, then run again (the rest is kept)")
    cv = cross_validate(tallies, r.objective)
    totals = [scores(sum_tallies(t, preset.num_classes)) for t in tallies]
    sizes = [sum(1 for i in ids if folds[i] == k) for k in range(r.folds)]
    report = TuneReport(preset, r.settings, totals, cv, r.variants[cv.chosen], len(ids), without_gt, failures, sizes,
                        time.perf_counter() - t0)
    _write_results(r, report)
    return report


def _inputs(r: TuneRequest, job: TuneJob) -> dict:
    return {"cams": file_identity(r.cams), "feats": file_identity(job.feats), "gt": file_identity(r.gt),
            "images": file_identity(r.images), "base": file_identity(r.base)}


def _prepare(r: TuneRequest, job: TuneJob) -> None:
    """Create ``out``; refuse to reuse counts of other settings or inputs unless ``overwrite``."""
    state = {"format": STATE_FORMAT, "variants": [v.to_dict() for v in r.variants], "inputs": _inputs(r, job)}
    try:
        (r.out / "images").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FileLevelError(f"cannot create {r.out / 'images'}: {exc.strerror or exc}") from None
    path = r.out / STATE
    if path.exists() and not r.overwrite:
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            recorded = None
        if recorded != state:
            raise FileLevelError(
                f"{r.out} holds the counts of another tune run (other settings or inputs, {path}); "
                "use --overwrite to start again, or another --out"
            )
    if r.overwrite:
        for old in (r.out / "images").glob("*.npz"):
            old.unlink()
    write_bytes_atomic(path, json.dumps(state, indent=2).encode() + b"\n")


def _write_results(r: TuneRequest, report: TuneReport) -> None:
    cv = report.cv
    document = {
        "format": PARAMS_FORMAT, "parameters": report.params.to_dict(), "objective": r.objective,
        "chosen": report.settings[cv.chosen], "in_sample": cv.in_sample,
        "cross_validation": {"folds": r.folds, "seed": r.seed, "pooled_held_out": cv.pooled,
                             "per_fold": [{"fold": f.index, "chosen": report.settings[f.chosen], "held_out": f.held_out,
                                           "other_folds": f.in_sample} for f in cv.folds]},
        "images": report.images,
    }
    write_bytes_atomic(r.out / "params.json", json.dumps(_clean(document), indent=2, allow_nan=False).encode() + b"\n")
    full = {**document, "variants": [{"settings": s, "scores": t} for s, t in zip(report.settings, report.totals)],
            "fold_sizes": report.fold_sizes, "without_gt": report.without_gt}
    write_bytes_atomic(r.out / "report.json", json.dumps(_clean(full), indent=2, allow_nan=False).encode() + b"\n")


def _clean(value):
    """NaN (an undefined score) as null: JSON has no NaN."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value
