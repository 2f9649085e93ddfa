"""Choosing parameters on labelled images, and what the choice is expected to give on unseen ones.

Pure maths on exact counts: every candidate setting has, per fold of images, a summed int64
confusion matrix and its vanished (image, class) pairs (a :class:`Tally`). k-fold
cross-validation chooses a setting on the other folds and scores it on the held-out one, so the
report states an out-of-sample figure instead of the best in-sample number.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .scores import class_scores, summary_scores

#: Objectives: the score each one ranks by, and whether higher is better.
OBJECTIVES = {
    "miou": ("miou", True),
    "vanished": ("vanished", False),
    "fwiou": ("fwiou", True),
    "pixel-accuracy": ("pixel_accuracy", True),
    "mean-accuracy": ("mean_accuracy", True),
}


@dataclass
class Tally:
    """Summed counts of one setting over some images."""

    confusion: np.ndarray  # (C, C + 1) int64
    vanished: int = 0  # vanished (image, class) pairs
    pairs: int = 0  # eligible (image, class) pairs
    images: int = 0

    @classmethod
    def empty(cls, num_classes: int) -> "Tally":
        return cls(np.zeros((num_classes, num_classes + 1), dtype=np.int64))

    def add(self, other: "Tally") -> "Tally":
        return Tally(self.confusion + other.confusion, self.vanished + other.vanished, self.pairs + other.pairs,
                     self.images + other.images)


def scores(tally: Tally) -> dict:
    """mIoU and friends (fractions; NaN when undefined), the per-class IoU (None for a class
    absent from both ground truth and prediction) and the vanished pairs of a tally."""
    per_class = class_scores(tally.confusion)
    summary = summary_scores(per_class)
    return {
        "miou": summary["miou"], "fwiou": summary["fwiou"], "pixel_accuracy": summary["pixel_accuracy"],
        "mean_accuracy": summary["mean_accuracy"], "vanished": tally.vanished, "pairs": tally.pairs, "images": tally.images,
        "iou": [float(v) if present else None for v, present in zip(per_class.iou, per_class.present)],
    }


def assign_folds(ids: list[str], k: int, seed: int = 0) -> dict[str, int]:
    """Each id's fold in ``0..k-1``: the sorted ids shuffled with ``seed``, dealt round-robin.

    Disjoint, covering, sizes within one of each other, and the same for the same ids and seed
    whatever order they come in.
    """
    if not 2 <= k <= len(ids):
        raise ValueError(f"folds must be between 2 and the number of images ({len(ids)}), got {k}")
    order = sorted(ids)
    np.random.default_rng(seed).shuffle(order)
    return {image_id: index % k for index, image_id in enumerate(order)}


def rank_key(score: dict, objective: str):
    """Sort key, larger is better: the objective, then fewer vanished pairs, then higher mIoU."""
    name, higher = OBJECTIVES[objective]
    value = score[name]
    value = -math.inf if value is None or (isinstance(value, float) and math.isnan(value)) else value
    miou = score["miou"] if not math.isnan(score["miou"]) else -math.inf
    return (value if higher else -value, -score["vanished"], miou)


def best(tallies: list[Tally], objective: str) -> int:
    """The index of the best setting (the first of equals)."""
    keys = [rank_key(scores(t), objective) for t in tallies]
    return max(range(len(keys)), key=lambda i: (keys[i], -i))


@dataclass
class Fold:
    """One round of cross-validation: the setting chosen without fold ``index``, scored on it."""

    index: int
    chosen: int
    held_out: dict
    in_sample: dict  # the chosen setting on the other folds


@dataclass
class CrossValidation:
    """What choosing by ``objective`` gives: per fold, pooled over the held-out folds, and the
    final choice (on every image) with its in-sample scores."""

    objective: str
    folds: list[Fold] = field(default_factory=list)
    pooled: dict = field(default_factory=dict)  # the held-out folds together, each with its own choice
    chosen: int = 0
    in_sample: dict = field(default_factory=dict)


def cross_validate(tallies: list[list[Tally]], objective: str) -> CrossValidation:
    """k-fold cross-validation over ``tallies[setting][fold]``.

    For each fold, the setting best on the other folds together is scored on that fold; the
    held-out counts are pooled (each fold contributing its own choice's counts). The final
    choice is the best setting on all folds.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    k = len(tallies[0])
    num_classes = tallies[0][0].confusion.shape[0]
    result = CrossValidation(objective)
    pooled = Tally.empty(num_classes)
    for fold in range(k):
        rest = [sum_tallies([t for j, t in enumerate(per_fold) if j != fold], num_classes) for per_fold in tallies]
        chosen = best(rest, objective)
        held = tallies[chosen][fold]
        pooled = pooled.add(held)
        result.folds.append(Fold(fold, chosen, scores(held), scores(rest[chosen])))
    result.pooled = scores(pooled)
    everything = [sum_tallies(per_fold, num_classes) for per_fold in tallies]
    result.chosen = best(everything, objective)
    result.in_sample = scores(everything[result.chosen])
    return result


def sum_tallies(tallies: list[Tally], num_classes: int) -> Tally:
    """The tallies added up (an empty one for none)."""
    total = Tally.empty(num_classes)
    for tally in tallies:
        total = total.add(tally)
    return total
