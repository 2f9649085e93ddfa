"""Known-answer tests of the score report (dhr_label.metrics.report), built from counts written
here: the vanished pairs per class, undefined scores as null, and the comparison of two reports
(which images got better or worse, by how much, the most of each, and the classes rescued or lost).
tests/cli/test_score.py checks the same numbers as the user reads them."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from dhr_label.metrics.report import ImageScore, ScoreRun, class_rows, compare_report, image_rows, score_report, summary
from dhr_label.presets import Preset

TOL = 1e-12  # ratios of small exact integers
PRESET = Preset("tiny", ("background", "cat", "dog"), 0, tuple(range(9)))
# 10 labelled pixels: background 7 (5 right, 1 as cat, 1 with no class id), cat 3 (right), dog none.
CONFUSION = np.array([[5, 1, 0, 1], [0, 3, 0, 0], [0, 0, 0, 0]], dtype=np.int64)


def image(image_id: str, miou: float = 0.5, *, eligible=(0, 1), vanished=(), labelled=10, correct=5) -> ImageScore:
    return ImageScore(image_id, False, labelled, correct, miou, tuple(eligible), tuple(vanished))


def report(images: list[ImageScore], confusion: np.ndarray = CONFUSION) -> dict:
    matching = SimpleNamespace(pred_dir="pred", missing=[], unknown=[])
    return score_report(ScoreRun(confusion, images), matching, PRESET, gt_dir="gt")


def test_vanished_pairs_are_counted_per_class_and_in_all():
    run = ScoreRun(CONFUSION, [image("a", vanished=(1,)), image("b"), image("c", eligible=(0,))])
    eligible, vanished = run.eligible_pairs()
    assert eligible.tolist() == [3, 2, 0] and vanished.tolist() == [0, 1, 0]
    rows = class_rows(run, PRESET)
    assert [(r["eligible_pairs"], r["vanished_pairs"], r["vanished_rate"]) for r in rows] == [(3, 0, 0.0), (2, 1, 0.5),
                                                                                              (0, 0, None)]
    assert summary(run)["vanished"] == {"pairs": 5, "vanished": 1, "rate": 1 / 5}


def test_class_rows_by_hand():
    background, cat, dog = class_rows(ScoreRun(CONFUSION), PRESET)
    assert (background["id"], background["name"], cat["name"]) == (0, "background", "cat")
    assert [background[k] for k in ("gt_pixels", "pred_pixels", "tp", "fp", "fn", "tn")] == [7, 5, 5, 0, 2, 3]
    assert [cat[k] for k in ("gt_pixels", "pred_pixels", "tp", "fp", "fn", "tn")] == [3, 4, 3, 1, 0, 6]
    assert background["iou"] == pytest.approx(5 / 7, abs=TOL) and cat["iou"] == pytest.approx(3 / 4, abs=TOL)
    assert cat["precision"] == pytest.approx(3 / 4, abs=TOL) and cat["fp_union"] == pytest.approx(1 / 4, abs=TOL)
    assert not dog["present"] and dog["iou"] is None and dog["recall"] is None  # undefined: null, not 0 or NaN


def test_summary_counts_the_pixels_predicted_with_no_class_id():
    got = summary(ScoreRun(CONFUSION))
    assert got["invalid_pred_pixels"] == 1 and got["labelled_pixels"] == 10
    assert got["miou"] == pytest.approx((5 / 7 + 3 / 4) / 2, abs=TOL)
    assert got["vanished"] == {"pairs": 0, "vanished": 0, "rate": None}


def test_nothing_labelled_is_null_everywhere():
    run = ScoreRun(np.zeros((3, 4), np.int64), [image("a", float("nan"), labelled=0, correct=0, eligible=())])
    got = summary(run)
    assert all(got[k] is None for k in ("miou", "pixel_accuracy", "mean_accuracy", "fwiou"))
    [row] = image_rows(run, PRESET)
    assert row["miou"] is None and row["pixel_accuracy"] is None and row["labelled_pixels"] == 0
    assert math.isnan(run.images[0].pixel_accuracy)


def test_image_rows_name_the_vanished_classes():
    [row] = image_rows(ScoreRun(CONFUSION, [image("a", 0.25, eligible=(0, 1, 2), vanished=(1, 2), correct=4)]), PRESET)
    assert row == {"id": "a", "missing": False, "labelled_pixels": 10, "correct_pixels": 4, "pixel_accuracy": 0.4,
                   "miou": 0.25, "eligible_classes": 3, "vanished": ["cat", "dog"]}


def test_the_report_says_which_images_were_missing_or_unknown():
    matching = SimpleNamespace(pred_dir="pred", missing=["m1", "m2"], unknown=["u1"])
    got = score_report(ScoreRun(CONFUSION, [image("a")]), matching, PRESET, gt_dir="gt")
    assert got["images"] == {"scored": 1, "missing": 2, "missing_ids": ["m1", "m2"], "unknown_pred": 1,
                             "unknown_pred_ids": ["u1"]}
    assert (got["pred"], got["gt"], got["classes"]) == ("pred", "gt", "tiny")


# ----------------------------------------------------------------------------------------------
# Two reports side by side
# ----------------------------------------------------------------------------------------------
# Per-image mIoU of PRED and COMPARE (binary fractions: the deltas are exact).
PRED = {"a": 0.5, "b": 0.75, "c": 0.25, "d": float("nan"), "e": 0.875, "f": 1.0, "g": 0.5, "h": 0.5}
OTHER = {"a": 0.5 + 1e-12, "b": 0.5, "c": 0.75, "d": 0.25, "f": 0.5, "g": 0.375, "h": 0.625}  # e: not scored


def _compared(top: int) -> dict:
    mine = report([image(i, m) for i, m in PRED.items()])
    theirs = report([image(i, m) for i, m in OTHER.items()])
    return compare_report(mine, theirs, top=top)


def test_images_better_worse_or_the_same_within_a_tolerance():
    images = _compared(top=5)["images"]
    # a: +1e-12 is the same; b, f, g better; c, h worse; d has no mIoU and e no COMPARE: neither counts.
    assert (images["better"], images["worse"], images["same"]) == (3, 2, 1)
    assert [(i["id"], i["delta_miou"]) for i in images["gained_most"]] == [("f", 0.5), ("b", 0.25), ("g", 0.125)]
    assert [(i["id"], i["delta_miou"]) for i in images["lost_most"]] == [("c", -0.5), ("h", -0.125)]


def test_only_the_top_gains_and_losses_are_listed():
    images = _compared(top=1)["images"]
    assert [i["id"] for i in images["gained_most"]] == ["f"] and [i["id"] for i in images["lost_most"]] == ["c"]
    assert (images["better"], images["worse"], images["same"]) == (3, 2, 1)  # counted whatever top


def test_per_image_deltas_skip_images_compare_did_not_score():
    per_image = {i["id"]: i for i in _compared(top=1)["per_image"]}
    assert sorted(per_image) == ["a", "b", "c", "d", "f", "g", "h"]
    assert per_image["d"] == {"id": "d", "miou": None, "miou_compare": 0.25, "delta_miou": None}
    assert per_image["b"]["delta_miou"] == 0.25


def test_class_and_summary_deltas_are_null_where_one_side_is_undefined():
    mine = report([image("a")])
    theirs = report([image("a")], np.array([[5, 1, 1, 0], [0, 3, 0, 0], [0, 0, 0, 0]]))  # dog predicted once
    compared = compare_report(mine, theirs, top=3)
    rows = {row["name"]: row for row in compared["per_class"]}
    assert rows["dog"]["iou"] is None and rows["dog"]["iou_compare"] == 0.0 and rows["dog"]["delta_iou"] is None
    assert rows["background"]["delta_iou"] == pytest.approx(5 / 7 - 5 / 7, abs=TOL)
    assert compared["summary"]["miou"]["delta"] == pytest.approx((5 / 7 + 3 / 4) / 2 - (5 / 7 + 3 / 4 + 0) / 3, abs=TOL)
    nothing = report([], np.zeros((3, 4), np.int64))
    assert compare_report(mine, nothing, top=3)["summary"]["miou"]["delta"] is None


def test_rescued_and_lost_pairs_follow_the_vanished_class_names():
    every = (0, 1, 2)
    mine = report([image("a", eligible=every, vanished=(1,)), image("b", eligible=every, vanished=(2,)),
                   image("c", eligible=every)])
    theirs = report([image("a", eligible=every, vanished=(2,)), image("b", eligible=every, vanished=(2,)),
                     image("c", eligible=every, vanished=(1, 2))])
    compared = compare_report(mine, theirs, top=3)
    rows = {row["name"]: row for row in compared["per_class"]}
    # cat: lost in a, rescued in c; dog: rescued in a and c, vanished in b on both sides.
    assert (rows["cat"]["rescued_pairs"], rows["cat"]["lost_pairs"]) == (1, 1)
    assert (rows["dog"]["rescued_pairs"], rows["dog"]["lost_pairs"]) == (2, 0)
    assert compared["vanished"]["rescued"] == 3 and compared["vanished"]["lost"] == 1
    assert compared["vanished"]["delta"] == 2 - 4
