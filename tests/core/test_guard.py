"""Our additions to Step 3: the vanished-class guard and the one-cell fallback."""
import numpy as np
import pytest

from dhr_label.core import dhr
from dhr_label.core.dhr import rebalance
from dhr_label.core.pipeline import guard_vanished
from dhr_label.params import DHRParams, Steps


def _masks():
    """M_init: class 1 everywhere but a 2 x 2 block of class 2 (4 of 64 pixels) and a 4 x 8
    band of class 3 (32 pixels). M_dh kept 1 pixel of class 2 and all of class 3 but 8 pixels."""
    init = np.ones((8, 8), dtype=np.uint8)
    init[0:2, 0:2] = 2
    init[4:8, :] = 3
    mask = init.copy()
    mask[0, 1] = mask[1, 0] = mask[1, 1] = 1  # class 2 keeps 1 of 4 pixels (25 %)
    mask[4, :] = 1  # class 3 keeps 24 of 32 (75 %)
    return init, mask


def test_guard_restores_a_class_that_kept_less_than_the_ratio():
    init, mask = _masks()
    out = guard_vanished(mask, init, np.array([1, 2, 3]), 0.5)
    assert (out[init == 2] == 2).all()  # 25 % < 50 %: restored
    assert (out[4] == 1).all()  # class 3 kept 75 % >= 50 %: left as M_dh has it
    assert (mask[0, 1] == 1) and (mask[4] == 1).all()  # the argument is not mutated


def test_guard_ratio_boundary_is_strict():
    init, mask = _masks()
    # class 2 kept exactly 25 %: a ratio of 0.25 does not restore it, 0.26 does
    assert (guard_vanished(mask, init, np.array([1, 2, 3]), 0.25)[init == 2] == 2).sum() == 1
    assert (guard_vanished(mask, init, np.array([1, 2, 3]), 0.26)[init == 2] == 2).sum() == 4


def test_guard_max_share_protects_only_minor_classes():
    init, mask = _masks()
    # class 2 holds 4/64 = 6.25 % of the pixels, class 3 50 %; at ratio 0.8 both vanished
    everything = guard_vanished(mask, init, np.array([1, 2, 3]), 0.8)
    assert (everything[init == 3] == 3).all() and (everything[init == 2] == 2).all()
    minor = guard_vanished(mask, init, np.array([1, 2, 3]), 0.8, max_share=0.1)
    assert (minor[init == 2] == 2).all()
    assert (minor[4] == 1).all()  # class 3 is not minor: not guarded


def _support():
    """Heat maps of classes 1, 2, 3 (slots 0-2): class 2's map reaches 0.3 on the top row of its
    block only (0.3 exactly at (0, 1)), 0.1 elsewhere."""
    heat = np.full((3, 8, 8), 0.1, dtype=np.float32)
    heat[1, 0, 0], heat[1, 0, 1] = 0.9, 0.3
    return heat


def test_guard_support_restores_only_where_the_class_heat_reaches_it():
    init, mask = _masks()
    heat, asked = _support(), []
    out = guard_vanished(mask, init, np.array([1, 2, 3]), 0.5, support=lambda slot: asked.append(slot) or heat[slot], threshold=0.3)
    assert out[0, 0] == 2 and out[0, 1] == 2  # >= the threshold (0.3 itself included): given back
    assert out[1, 0] == 1 and out[1, 1] == 1  # below it: left as M_dh has them
    assert (out[4] == 1).all()  # class 3 was not guarded ...
    assert asked == [1]  # ... and its map was never asked for (the batched executor moves maps lazily)


def test_guard_support_zero_gives_back_the_whole_region():
    init, mask = _masks()
    whole = guard_vanished(mask, init, np.array([1, 2, 3]), 0.5, support=_support().__getitem__, threshold=0.0)
    np.testing.assert_array_equal(whole, guard_vanished(mask, init, np.array([1, 2, 3]), 0.5))
    assert (whole[init == 2] == 2).all()


def test_guard_ignores_ignore_pixels_in_the_share():
    init, mask = _masks()
    init = init.copy()
    init[2:4, :] = 255  # 16 ignore pixels: class 2 is now 4/48 = 8.3 % of the labelled ones
    mask = mask.copy()
    mask[2:4, :] = 1
    assert (guard_vanished(mask, init, np.array([1, 2, 3]), 0.5, max_share=0.08)[init == 2] == 2).sum() == 1
    assert (guard_vanished(mask, init, np.array([1, 2, 3]), 0.5, max_share=0.09)[init == 2] == 2).sum() == 4


def test_guard_zero_is_the_papers_step_3(monkeypatch):
    rng = np.random.default_rng(0)
    init = np.zeros((12, 16), dtype=np.uint8)
    init[:, 8:] = 1
    uss = rng.normal(size=(4, 3, 4)).astype(np.float32)
    paper = DHRParams(steps=Steps.row(5), guard=0.0)
    off = rebalance(init, uss=uss, wss=None, params=paper, crf=None).mask
    on = rebalance(init, uss=uss, wss=None, params=DHRParams(steps=Steps.row(5), guard=1.0, guard_support=0.0), crf=None).mask
    # with guard 1.0 (whole regions) every class whose M_init region changed at all gets it back ...
    assert (on == init).all() and not (off == init).all()  # ... and in this scene Step 3 changed some
    # guard 0 is Step 3 as the paper has it: the guard is never consulted
    monkeypatch.setattr(dhr, "guard_vanished", lambda *a, **k: pytest.fail("guard 0 must not run the guard"))
    np.testing.assert_array_equal(rebalance(init, uss=uss, wss=None, params=paper, crf=None).mask, off)


def test_one_feature_cell_keeps_m_init():
    init = np.zeros((6, 6), dtype=np.uint8)
    init[:3] = 2
    uss = np.ones((5, 1, 1), dtype=np.float32)
    out = rebalance(init, uss=uss, wss=None, params=DHRParams(steps=Steps.row(5)), crf=None)
    mask, groups = out.mask, out.groups
    assert (mask == init).all() and groups == []


def test_missing_feature_source_is_named():
    init = np.zeros((6, 6), dtype=np.uint8)
    init[:3] = 2
    with pytest.raises(ValueError, match="USS"):
        rebalance(init, uss=None, wss=None, params=DHRParams(steps=Steps.row(5)), crf=None)


def test_guard_parameters_are_checked():
    with pytest.raises(ValueError, match="guard"):
        DHRParams(guard=1.5)
    with pytest.raises(ValueError, match="guard max share"):
        DHRParams(guard_max_share=0.0)
