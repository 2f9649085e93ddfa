"""The score report: the reduced result of a scoring run as JSON-ready dicts.

Pure functions of exact integer counts (a summed int64 confusion matrix and per-image
numbers), so the table, ``--json`` and ``--csv`` all show the same numbers.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .._version import __version__
from ..errors import InputError
from ..presets import Preset
from . import ClassScores, class_scores, summary_scores
from .scores import VANISHED_MAX_IOU, VANISHED_MIN_SHARE


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


def score_report(run: ScoreRun, matching, preset: Preset, *, gt_dir) -> dict:
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

    Both are :func:`score_report` outputs over the same ground-truth ids. Per class, the
    vanished (image, class) pairs of both, their difference, and which pairs changed: *rescued*
    (vanished in COMPARE, not in PRED) and *lost* (vanished in PRED, not in COMPARE), so
    ``delta_vanished_pairs = lost - rescued``.
    """
    theirs_by_id = {row["id"]: row for row in other["per_image"]}
    rescued, lost = _changed_pairs(report["per_image"], theirs_by_id)
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
            "delta_vanished_pairs": mine["vanished_pairs"] - theirs["vanished_pairs"],
            "rescued_pairs": rescued[mine["name"]],
            "lost_pairs": lost[mine["name"]],
        })
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
            "delta": report["summary"]["vanished"]["vanished"] - other["summary"]["vanished"]["vanished"],
            "rescued": sum(rescued.values()),
            "lost": sum(lost.values()),
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


def _changed_pairs(images: list[dict], theirs_by_id: dict[str, dict]) -> tuple[Counter, Counter]:
    """Per class name, the (image, class) pairs vanished only in COMPARE (rescued by PRED) and
    only in PRED (lost by it), over the images both scored."""
    rescued, lost = Counter(), Counter()
    for row in images:
        theirs = theirs_by_id.get(row["id"])
        if theirs is None:
            continue
        mine, before = set(row["vanished"]), set(theirs["vanished"])
        rescued.update(before - mine)
        lost.update(mine - before)
    return rescued, lost


def _delta(a, b):
    return None if a is None or b is None else a - b
