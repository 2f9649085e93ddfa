"""The scorer's engine: pairing ground truth with predictions, and scoring them over workers.

Map: one worker reads a chunk of (ground truth, prediction) pairs and returns the chunk's
summed int64 confusion matrix and a few numbers per image. Reduce: sum. The report itself
(:mod:`dhr_label.metrics.report`) is plain JSON-ready dicts, so the table, ``--json`` and
``--csv`` all show the same numbers.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from ..errors import FileLevelError, InputError
from ..io.ids import mask_files
from ..io.manifest import manifest_files, read_manifest
from ..io.masks import read_mask, read_provenance
from ..metrics import confusion_matrix, image_miou, vanished_classes
from ..metrics.report import ImageScore, ScoreRun
from .parallel import chunked, map_chunks

#: How many ids a message names before it says "and N more".
SHOWN_IDS = 5


@dataclass(frozen=True)
class Pair:
    """One image to score: its ground truth and its prediction (None when missing)."""

    image_id: str
    gt: Path
    pred: Path | None


@dataclass(frozen=True)
class Matching:
    """The pairs of one prediction directory against the ground truth."""

    pred_dir: Path
    pairs: list[Pair]
    missing: list[str]  # ground-truth ids with no prediction
    unknown: list[str]  # predictions with no ground truth


def first_ids(ids: list[str], limit: int = SHOWN_IDS) -> str:
    """``a, b, c and 12 more`` for messages."""
    shown = ", ".join(ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def ground_truth(gt_dir: Path) -> dict[str, Path]:
    """``{id: path}`` of every ground-truth mask in ``gt_dir``.

    Raises
    ------
    FileLevelError
        When the directory holds no mask.
    """
    found = mask_files(gt_dir)
    if not found:
        raise FileLevelError(f"no <id>.png ground-truth mask in {gt_dir}")
    return found


def select(gt: dict[str, Path], ids: list[str], *, gt_dir: Path) -> dict[str, Path]:
    """The ground truth of ``ids``, in their order.

    Raises
    ------
    FileLevelError
        When some id has no ground truth.
    """
    lacking = [i for i in ids if i not in gt]
    if lacking:
        raise FileLevelError(
            f"{len(lacking)} of the {len(ids)} listed ids have no ground truth in {gt_dir}: "
            f"{first_ids(lacking)}"
        )
    return {i: gt[i] for i in ids}


def match(gt: dict[str, Path], pred_dir: Path, *, known: set[str] | None = None) -> Matching:
    """Pair every ground-truth mask with ``<pred_dir>/<id>.png``.

    ``known``: every id with a ground truth (when ``gt`` is a subset); a prediction outside it
    is *unknown*. Predictions of known ids outside the subset are neither scored nor unknown.
    """
    preds = mask_files(pred_dir)
    pairs = [Pair(i, path, preds.get(i)) for i, path in gt.items()]
    missing = [p.image_id for p in pairs if p.pred is None]
    known = set(gt) if known is None else known
    unknown = [i for i in preds if i not in known]
    return Matching(Path(pred_dir), pairs, missing, unknown)


def missing_error(matching: Matching, *, made: bool = False) -> FileLevelError:
    """The error for predictions missing without ``--allow-missing``; ``made``: the ids scored
    are those of :func:`made_ids`, so the missing ones are images refine failed."""
    n, total = len(matching.missing), len(matching.pairs)
    first = first_ids(matching.missing)
    if made:
        return FileLevelError(
            f"{n} of the {total} images refine made or tried in {matching.pred_dir} have no mask: the manifest lists "
            f"them as failed (first: {first}); pass --allow-missing to score them as all-wrong"
        )
    partial = " pass --made to score only the images refine made there (a run with --limit, --ids or --shard, or one" \
              " that was interrupted), or" if manifest_files(matching.pred_dir) else " pass --ids FILE to score a subset, or"
    return FileLevelError(
        f"{n} of {total} ground-truth masks have no prediction in {matching.pred_dir} (first: {first});"
        f"{partial} --allow-missing to score them as all-wrong"
    )


def made_ids(pred_dir: Path) -> list[str]:
    """The ids refine made or tried in ``pred_dir``: its masks, and the images the runs of its
    manifests list as failed (and that have no mask since), sorted.

    Raises
    ------
    FileLevelError
        When ``pred_dir`` has no dhr-label manifest (it is not a refine output directory), or
        one cannot be read.
    """
    manifests = manifest_files(pred_dir)
    if not manifests:
        raise FileLevelError(f"--made: {pred_dir} holds no dhr-label manifest (is it a refine --out?); "
                             "list the ids to score with --ids FILE")
    ids = set(mask_files(pred_dir))
    for path in manifests:
        try:
            runs = read_manifest(path).get("runs", [])
        except (OSError, ValueError) as exc:
            raise FileLevelError(f"--made: cannot read the manifest {path}: {exc}") from None
        ids.update(f["id"] for run in runs for f in run.get("failures", []) if "id" in f)
    return sorted(ids)


def settings_mix(matching: Matching) -> Counter:
    """How many of the scored predictions each setting made: ``{fingerprint id: masks}``, None
    for masks that record none (another tool's, or dhr-label's before 0.2)."""
    return Counter(read_provenance(p.pred) for p in matching.pairs if p.pred is not None)


def score_pair(pair: Pair, *, num_classes: int, ignore_index: int) -> tuple[np.ndarray, ImageScore]:
    """Read and score one image.

    Raises
    ------
    InputError
        When a mask cannot be read, the sizes differ, or the ground truth holds an id that is
        no class.
    """
    gt = _read(pair.image_id, pair.gt, "ground truth")
    pred = None if pair.pred is None else _read(pair.image_id, pair.pred, "prediction")
    if pred is not None and pred.shape != gt.shape:
        raise InputError(
            pair.image_id,
            str(pair.pred),
            f"prediction is {pred.shape[0]} x {pred.shape[1]} (H x W) but the ground truth "
            f"{pair.gt} is {gt.shape[0]} x {gt.shape[1]}",
        )
    try:
        confusion = confusion_matrix(pred, gt, num_classes=num_classes, ignore_index=ignore_index)
    except ValueError as exc:
        raise InputError(pair.image_id, str(pair.gt), str(exc)) from None
    eligible, vanished = vanished_classes(confusion)
    score = ImageScore(
        image_id=pair.image_id,
        missing=pred is None,
        labelled=int(confusion.sum()),
        correct=int(np.trace(confusion[:, :num_classes])),
        miou=image_miou(confusion),
        eligible=tuple(np.flatnonzero(eligible).tolist()),
        vanished=tuple(np.flatnonzero(vanished).tolist()),
    )
    return confusion, score


def _read(image_id: str, path, what: str) -> np.ndarray:
    try:
        return read_mask(path)
    except (OSError, ValueError) as exc:
        raise InputError(image_id, str(path), f"cannot read the {what} mask: {exc}") from None


def _score_chunk(pairs: list[Pair], *, num_classes: int, ignore_index: int):
    total = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
    scores, failures = [], []
    for pair in pairs:
        try:
            confusion, score = score_pair(pair, num_classes=num_classes, ignore_index=ignore_index)
        except InputError as exc:  # sent back as a tuple: InputError does not unpickle
            failures.append((exc.image_id, exc.source, exc.problem))
            continue
        total += confusion
        scores.append(score)
    return total, scores, failures


def score_pairs(
    pairs: list[Pair],
    *,
    num_classes: int,
    ignore_index: int = 255,
    workers: int = 1,
    on_images: Callable[[int], None] | None = None,
) -> ScoreRun:
    """Score every pair; sum the confusion matrices; collect per-image scores and failures.

    ``on_images(n)`` is called in this process as each batch of ``n`` images completes.
    A failed image adds nothing to the confusion matrix and is listed in ``failures``.
    """
    run = ScoreRun(np.zeros((num_classes, num_classes + 1), dtype=np.int64))
    work = partial(_score_chunk, num_classes=num_classes, ignore_index=ignore_index)
    done = None if on_images is None else (lambda chunk, _result: on_images(len(chunk)))
    for total, scores, failures in map_chunks(
        work, chunked(pairs, workers=workers), workers=workers, on_done=done
    ):
        run.confusion += total
        run.images.extend(scores)
        run.failures.extend(InputError(*failure) for failure in failures)
    run.images.sort(key=lambda s: s.image_id)
    run.failures.sort(key=lambda e: e.image_id)
    return run


#: Two per-image mIoUs closer than this count as the same in a comparison.
