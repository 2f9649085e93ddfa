"""Scoring masks against ground truth: pairing files, map/reduce over images, reports.

Map: one worker reads a chunk of (ground truth, prediction) pairs and returns the chunk's
summed int64 confusion matrix and a few numbers per image. Reduce: sum. The reports are plain
JSON-ready dicts, so the table, ``--json`` and ``--csv`` all show the same numbers.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from . import __version__
from .errors import FileLevelError, InputError
from .io.ids import mask_files
from .io.masks import read_mask
from .metrics import ClassScores, class_scores, confusion_matrix, image_miou, summary_scores, vanished_classes
from .metrics.scores import VANISHED_MAX_IOU, VANISHED_MIN_SHARE
from .presets import Preset
from .runtime.parallel import chunked, map_chunks


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


def missing_error(matching: Matching) -> FileLevelError:
    """The error for predictions missing without ``--allow-missing``."""
    n, total = len(matching.missing), len(matching.pairs)
    return FileLevelError(
        f"{n} of {total} ground-truth masks have no prediction in {matching.pred_dir} "
        f"(first: {first_ids(matching.missing)}); pass --allow-missing to score them as all-wrong"
    )


@dataclass(frozen=True)
class ImageScore:
    """What the reports need of one image (small: it travels back from a worker)."""

    image_id: str
    missing: bool  # scored as all-wrong
    labelled: int  # ground-truth pixels that are not ignore
    correct: int
    miou: float  # over the classes in this image's GT or prediction; NaN when none
    eligible: tuple[int, ...]  # GT classes counted by the vanished view
    vanished: tuple[int, ...]  # those of them with IoU < 0.1

    @property
    def pixel_accuracy(self) -> float:
        return self.correct / self.labelled if self.labelled else float("nan")


@dataclass
class ScoreRun:
    """The reduced result of scoring one prediction directory."""

    confusion: np.ndarray  # (C, C + 1) int64, summed over the images
    images: list[ImageScore] = field(default_factory=list)  # sorted by id
    failures: list[InputError] = field(default_factory=list)  # sorted by id

    def eligible_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """Per class: (image, class) pairs counted by the vanished view, and vanished ones."""
        c = self.confusion.shape[0]
        eligible = np.zeros(c, dtype=np.int64)
        vanished = np.zeros(c, dtype=np.int64)
        for image in self.images:
            eligible[list(image.eligible)] += 1
            vanished[list(image.vanished)] += 1
        return eligible, vanished


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
SAME_TOLERANCE = 1e-9


def number(value):
    """A float for JSON: NaN (undefined) becomes None (null)."""
    value = float(value)
    return None if math.isnan(value) else value


def _rate(part: int, whole: int):
    return part / whole if whole else None


def class_rows(run: ScoreRun, preset: Preset) -> list[dict]:
    """One dict per class: counts, the ratios of :class:`ClassScores`, the vanished view."""
    scores: ClassScores = class_scores(run.confusion)
    eligible, vanished = run.eligible_pairs()
    rows = []
    for c, name in enumerate(preset.classes):
        row = {"id": c, "name": name, "present": bool(scores.present[c])}
        for key in ("gt_pixels", "pred_pixels", "tp", "fp", "fn", "tn"):
            row[key] = int(getattr(scores, key)[c])
        for key in ClassScores.RATIOS:
            row[key] = number(getattr(scores, key)[c])
        row["vanished_pairs"] = int(vanished[c])
        row["eligible_pairs"] = int(eligible[c])
        row["vanished_rate"] = _rate(int(vanished[c]), int(eligible[c]))
        rows.append(row)
    return rows


def image_rows(run: ScoreRun, preset: Preset) -> list[dict]:
    """One dict per scored image (sorted by id)."""
    return [_image_row(image, preset) for image in run.images]


def _image_row(image: ImageScore, preset: Preset) -> dict:
    return {
        "id": image.image_id,
        "missing": image.missing,
        "labelled_pixels": image.labelled,
        "correct_pixels": image.correct,
        "pixel_accuracy": number(image.pixel_accuracy),
        "miou": number(image.miou),
        "eligible_classes": len(image.eligible),
        "vanished": [preset.classes[c] for c in image.vanished],
    }


def summary(run: ScoreRun) -> dict:
    """Dataset-level scores and the vanished rate of a run."""
    scores = class_scores(run.confusion)
    result = {k: (number(v) if isinstance(v, float) else v) for k, v in summary_scores(scores).items()}
    eligible, vanished = run.eligible_pairs()
    result["invalid_pred_pixels"] = scores.invalid_pixels
    result["vanished"] = {
        "pairs": int(eligible.sum()),
        "vanished": int(vanished.sum()),
        "rate": _rate(int(vanished.sum()), int(eligible.sum())),
    }
    return result


def score_report(run: ScoreRun, matching: Matching, preset: Preset, *, gt_dir) -> dict:
    """The whole report of one prediction directory (``--json`` prints exactly this)."""
    return {
        "tool": "dhr-label score",
        "version": __version__,
        "pred": str(matching.pred_dir),
        "gt": str(gt_dir),
        "classes": preset.name,
        "vanished_definition": {
            "min_share": VANISHED_MIN_SHARE,
            "max_iou": VANISHED_MAX_IOU,
            "text": "(image, GT class) pairs with the class covering >= 0.1 % of the image's "
            "labelled pixels; vanished when its per-image IoU < 0.1",
        },
        "images": {
            "scored": len(run.images),
            "missing": len(matching.missing),
            "missing_ids": list(matching.missing),
            "unknown_pred": len(matching.unknown),
            "unknown_pred_ids": list(matching.unknown),
        },
        "summary": summary(run),
        "per_class": class_rows(run, preset),
        "per_image": image_rows(run, preset),
    }


def compare_report(report: dict, other: dict, *, top: int) -> dict:
    """Side by side: ``report`` (PRED) against ``other`` (COMPARE); deltas are PRED - COMPARE.

    Both are :func:`score_report` outputs over the same ground-truth ids.
    """
    classes = []
    for mine, theirs in zip(report["per_class"], other["per_class"]):
        classes.append({
            "id": mine["id"],
            "name": mine["name"],
            "iou": mine["iou"],
            "iou_compare": theirs["iou"],
            "delta_iou": _delta(mine["iou"], theirs["iou"]),
            "vanished_pairs": mine["vanished_pairs"],
            "vanished_pairs_compare": theirs["vanished_pairs"],
        })
    theirs_by_id = {row["id"]: row for row in other["per_image"]}
    images = []
    for row in report["per_image"]:
        theirs = theirs_by_id.get(row["id"])
        if theirs is None:
            continue
        delta = _delta(row["miou"], theirs["miou"])
        images.append({"id": row["id"], "miou": row["miou"], "miou_compare": theirs["miou"],
                       "delta_miou": delta})
    ranked = sorted((i for i in images if i["delta_miou"] is not None),
                    key=lambda i: (i["delta_miou"], i["id"]))
    deltas = np.array([i["delta_miou"] for i in ranked], dtype=np.float64)
    return {
        "compare": other["pred"],
        "summary": {
            key: {"pred": report["summary"][key], "compare": other["summary"][key],
                  "delta": _delta(report["summary"][key], other["summary"][key])}
            for key in ("miou", "pixel_accuracy", "mean_accuracy", "fwiou")
        },
        "vanished": {
            "pred": report["summary"]["vanished"],
            "compare": other["summary"]["vanished"],
        },
        "images": {
            "better": int((deltas > SAME_TOLERANCE).sum()),
            "worse": int((deltas < -SAME_TOLERANCE).sum()),
            "same": int((np.abs(deltas) <= SAME_TOLERANCE).sum()),
            "gained_most": [i for i in reversed(ranked[-top:]) if i["delta_miou"] > SAME_TOLERANCE],
            "lost_most": [i for i in ranked[:top] if i["delta_miou"] < -SAME_TOLERANCE],
        },
        "per_class": classes,
        "per_image": images,
    }


def _delta(a, b):
    return None if a is None or b is None else a - b
