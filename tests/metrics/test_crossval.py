"""Known-answer tests of the cross-validation maths (dhr_label.metrics.crossval): tallies and their
scores, folds, the ranking of settings by each objective, and what is held out."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dhr_label.metrics.crossval import OBJECTIVES, Tally, assign_folds, best, cross_validate, rank_key, scores, sum_tallies

TOL = 1e-12  # scores are ratios of exact integers: only the rounding of a few divisions


def test_folds_are_disjoint_covering_balanced_and_order_free():
    ids = [f"id{i}" for i in range(11)]
    folds = assign_folds(ids, 3, seed=1)
    assert sorted(folds) == sorted(ids) and set(folds.values()) == {0, 1, 2}
    sizes = sorted(list(folds.values()).count(k) for k in range(3))
    assert sizes == [3, 4, 4]
    assert assign_folds(list(reversed(ids)), 3, seed=1) == folds
    with pytest.raises(ValueError, match="between 2 and the number of images"):
        assign_folds(ids[:1], 2)


def test_folds_as_many_as_images_put_one_image_in_each_and_more_are_refused():
    ids = ["a", "b", "c"]
    assert sorted(assign_folds(ids, 3).values()) == [0, 1, 2]
    with pytest.raises(ValueError, match=r"between 2 and the number of images \(3\), got 4"):
        assign_folds(ids, 4)
    with pytest.raises(ValueError, match=r"got 1"):
        assign_folds(ids, 1)


def _tally(correct: int, wrong: int) -> Tally:
    """Two classes; class 0 right ``correct`` times, wrong ``wrong`` times; class 1 always right."""
    confusion = np.array([[correct, wrong, 0], [0, 10, 0]], dtype=np.int64)
    return Tally(confusion, 0, 2, 1)


def _miou(correct: int, wrong: int, tallies: int = 1) -> float:
    """The mIoU of ``tallies`` of them summed: class 1 holds 10 pixels each."""
    right = 10 * tallies
    return (correct / (correct + wrong) + right / (right + wrong)) / 2


def test_held_out_scores_are_of_the_setting_chosen_without_that_fold():
    # Setting 0 is the best on fold 0 alone; setting 1 on folds 1 and 2, and on any two folds.
    counts = [[(10, 0), (5, 5), (5, 5)], [(8, 2), (9, 1), (9, 1)]]
    cv = cross_validate([[_tally(*c) for c in folds] for folds in counts], "miou")
    assert [f.chosen for f in cv.folds] == [1, 1, 1]
    assert cv.folds[0].held_out["miou"] == pytest.approx(_miou(8, 2))  # setting 1 on fold 0
    assert cv.pooled["miou"] == pytest.approx(_miou(8 + 9 + 9, 2 + 1 + 1, 3))
    assert cv.chosen == 1 and cv.in_sample["miou"] == pytest.approx(_miou(26, 4, 3))
    # Where the choice depends on the held-out fold: setting 0 is best unless fold 2 is in.
    counts = [[(10, 0), (10, 0), (0, 10)], [(7, 3), (7, 3), (10, 0)]]
    cv = cross_validate([[_tally(*c) for c in folds] for folds in counts], "miou")
    assert [f.chosen for f in cv.folds] == [1, 1, 0]
    assert cv.pooled["miou"] == pytest.approx(_miou(7 + 7 + 0, 3 + 3 + 10, 3))


# ----------------------------------------------------------------------------------------------
# Tallies and their scores
# ----------------------------------------------------------------------------------------------
def test_an_empty_tally_is_zero_counts_of_the_classes():
    empty = Tally.empty(3)
    assert empty.confusion.shape == (3, 4) and empty.confusion.dtype == np.int64
    assert not empty.confusion.any() and (empty.vanished, empty.pairs, empty.images) == (0, 0, 0)


def test_sum_tallies_adds_every_count_and_leaves_its_terms_alone():
    a = Tally(np.array([[1, 2, 0], [0, 3, 1]]), vanished=1, pairs=2, images=1)
    b = Tally(np.array([[4, 0, 1], [2, 5, 0]]), vanished=0, pairs=3, images=2)
    total = sum_tallies([a, b], 2)
    assert total.confusion.tolist() == [[5, 2, 1], [2, 8, 1]]
    assert (total.vanished, total.pairs, total.images) == (1, 5, 3)
    assert a.confusion.tolist() == [[1, 2, 0], [0, 3, 1]]  # not added in place
    nothing = sum_tallies([], 2)
    assert nothing.confusion.tolist() == [[0, 0, 0], [0, 0, 0]] and nothing.images == 0


def test_scores_of_a_tally_by_hand():
    # class 0: 6 right, 2 as class 1; class 1: 3 right, 1 with no class id; class 2 absent.
    tally = Tally(np.array([[6, 2, 0, 0], [0, 3, 0, 1], [0, 0, 0, 0]]), vanished=2, pairs=7, images=4)
    got = scores(tally)
    iou0, iou1 = 6 / 8, 3 / 6  # union of class 1: 4 in GT + 5 predicted - 3 both
    assert got["iou"][:2] == pytest.approx([iou0, iou1], abs=TOL) and got["iou"][2] is None
    assert got["miou"] == pytest.approx((iou0 + iou1) / 2, abs=TOL)
    assert got["pixel_accuracy"] == pytest.approx(9 / 12, abs=TOL)
    assert got["mean_accuracy"] == pytest.approx((6 / 8 + 3 / 4) / 2, abs=TOL)
    assert got["fwiou"] == pytest.approx(8 / 12 * iou0 + 4 / 12 * iou1, abs=TOL)
    assert (got["vanished"], got["pairs"], got["images"]) == (2, 7, 4)


def test_scores_of_an_empty_tally_are_undefined_not_zero():
    got = scores(Tally.empty(2))
    assert all(math.isnan(got[k]) for k in ("miou", "pixel_accuracy", "mean_accuracy", "fwiou"))
    assert got["iou"] == [None, None]


# ----------------------------------------------------------------------------------------------
# Ranking settings by each objective
# ----------------------------------------------------------------------------------------------
# Two settings that the objectives rank differently (class 0: 100 pixels, class 1: 10):
# BIG keeps class 0 whole and loses class 1; SMALL gives class 1 twenty pixels of class 0.
BIG = Tally(np.array([[100, 0, 0], [10, 0, 0]]), vanished=1, pairs=2, images=1)
SMALL = Tally(np.array([[80, 20, 0], [0, 10, 0]]), vanished=0, pairs=2, images=1)


def test_the_objectives_rank_by_their_own_score():
    # BIG: mIoU (100/110 + 0) / 2 = 0.455, pixel accuracy 100/110, mean accuracy (1 + 0) / 2,
    #      fwIoU 100/110 * 100/110 = 0.826
    # SMALL: mIoU (80/100 + 10/30) / 2 = 0.567, pixel accuracy 90/110, mean accuracy (0.8 + 1) / 2,
    #      fwIoU 100/110 * 0.8 + 10/110 * 1/3 = 0.758
    expected = {"miou": 1, "vanished": 1, "fwiou": 0, "pixel-accuracy": 0, "mean-accuracy": 1}
    assert set(expected) == set(OBJECTIVES)
    for objective, index in expected.items():
        assert best([BIG, SMALL], objective) == index, objective
        assert best([SMALL, BIG], objective) == 1 - index, objective  # not by position


def test_fewer_vanished_pairs_rank_higher():
    score = scores(SMALL)
    assert rank_key({**score, "vanished": 0}, "vanished") > rank_key({**score, "vanished": 3}, "vanished")


def test_ties_are_broken_by_fewer_vanished_pairs_then_by_miou_then_by_position():
    same = np.array([[8, 2, 0], [0, 10, 0]])
    fewer = Tally(same, vanished=1, pairs=4, images=2)
    more = Tally(same, vanished=2, pairs=4, images=2)
    assert best([more, fewer], "miou") == 1  # equal mIoU: fewer vanished pairs
    # Equal vanished pairs: the higher mIoU, although the objective is the vanished count.
    low = Tally(np.array([[5, 5, 0], [0, 10, 0]]), vanished=1, pairs=4, images=2)
    assert best([low, fewer], "vanished") == 1 and best([fewer, low], "vanished") == 0
    # Equal pixel accuracy (18 of 20) and vanished pairs: the higher mIoU.
    spread = Tally(np.array([[9, 1, 0], [1, 9, 0]]), vanished=1, pairs=4, images=2)  # mIoU 9/11
    assert best([fewer, spread], "pixel-accuracy") == 1  # fewer: mIoU (8/10 + 10/12) / 2 < 9/11
    assert best([fewer, Tally(same, 1, 4, 2)], "miou") == 0  # equal in everything: the first


def test_an_undefined_score_ranks_below_every_number():
    nothing = Tally.empty(2)  # no labelled pixel: every score NaN
    worst = Tally(np.array([[0, 10, 0], [10, 0, 0]]), vanished=2, pairs=2, images=1)  # mIoU 0
    for objective in ("miou", "fwiou", "pixel-accuracy", "mean-accuracy"):
        assert best([nothing, worst], objective) == 1, objective


def test_an_unknown_objective_is_refused():
    with pytest.raises(ValueError, match=r"objective must be one of miou, vanished, .*got 'speed'"):
        cross_validate([[_tally(1, 0), _tally(1, 0)]], "speed")


# ----------------------------------------------------------------------------------------------
# What cross-validation reports
# ----------------------------------------------------------------------------------------------
def test_in_sample_scores_of_a_fold_are_the_choice_on_the_other_folds():
    counts = [[(10, 0), (5, 5), (5, 5)], [(8, 2), (9, 1), (9, 1)]]
    cv = cross_validate([[_tally(*c) for c in folds] for folds in counts], "miou")
    # Fold 0 held out: setting 1 chosen on folds 1 and 2, i.e. 18 right, 2 wrong over 2 tallies.
    assert cv.folds[0].in_sample["miou"] == pytest.approx(_miou(18, 2, 2), abs=TOL)
    assert [f.index for f in cv.folds] == [0, 1, 2]
    # Each image is held out once: the pooled counts are of 3 folds of one image each.
    assert (cv.pooled["images"], cv.pooled["pairs"]) == (3, 6)
    assert cv.objective == "miou"


def test_choosing_by_vanished_pairs_holds_out_the_counts_of_that_choice():
    # Setting 0: more mIoU, but one vanished pair in every fold; setting 1: none, lower mIoU.
    keeps = [Tally(np.array([[9, 1, 0], [0, 10, 0]]), 1, 2, 1) for _ in range(2)]
    loses = [Tally(np.array([[6, 4, 0], [0, 10, 0]]), 0, 2, 1) for _ in range(2)]
    by_miou = cross_validate([keeps, loses], "miou")
    by_vanished = cross_validate([keeps, loses], "vanished")
    assert [f.chosen for f in by_miou.folds] == [0, 0] and by_miou.chosen == 0
    assert [f.chosen for f in by_vanished.folds] == [1, 1] and by_vanished.chosen == 1
    assert by_vanished.pooled["vanished"] == 0 and by_miou.pooled["vanished"] == 2
    assert by_vanished.pooled["miou"] == pytest.approx(_miou(12, 8, 2), abs=TOL)
