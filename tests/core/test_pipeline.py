"""The pipeline's decisions: which stage comes next, when M_init is the answer, which OT calls run
with which class marginal, what decides Step 1, and how a variant resumes after it."""
import numpy as np
import pytest
import torch

from dhr_label.core import pipeline
from dhr_label.core.pipeline import (
    Stage,
    advance,
    class_counts,
    class_marginal,
    needs_wss_maps,
    new_state,
    present_classes,
    prototype_rows,
    rebalance_transports,
    resume,
    seed_transport,
    start,
    step1_settings,
)
from dhr_label.core.prototypes import Prototypes
from dhr_label.params import CRFParams, DHRParams, Marginal, OTParams, Steps


def _state(init=None, *, labels=(3, 5), uss=(2, 3, 3), wss=((4, 3, 3),), base=None, prototypes=None):
    state = new_state(np.zeros((len(labels), 2, 2), np.float32), np.array(labels), np.zeros((6, 6, 3), np.uint8), base,
                      None if uss is None else np.zeros(uss, np.float32),
                      None if wss is None else [np.zeros(s, np.float32) for s in wss], prototypes=prototypes)
    if init is not None:
        state.init = torch.as_tensor(init)
        state.init_counts = class_counts(state.init)
    return state


def test_class_marginal_kinds():
    counts = class_counts(torch.tensor([[1, 1, 1, 2], [1, 1, 2, 255], [9, 9, 9, 9]], dtype=torch.uint8))
    classes = np.array([1, 2, 7])
    assert class_marginal(Marginal.uniform, classes, counts, 0.01) == (None, False)
    assert class_marginal(Marginal.unbalanced, classes, counts, 0.01) == (None, True)
    assert class_marginal(Marginal.area, classes, None, 0.01) == (None, False)
    v, kl = class_marginal(Marginal.area, classes, counts, 0.01)  # 5, 2, 0 (ignore and 9 are not among them)
    assert not kl
    np.testing.assert_allclose(v, np.array([5 / 7, 2 / 7, 0.01]) / (1 + 0.01), atol=1e-15)
    assert class_marginal(Marginal.area, np.array([4, 6]), counts, 0.01) == (None, False)  # none of them present: uniform


def test_present_classes_exclude_ignore():
    assert present_classes(class_counts(torch.tensor([[4, 255, 0], [4, 4, 9]], dtype=torch.uint8))).tolist() == [0, 4, 9]


def test_start_checks_inputs_and_row_1_is_a_copy_of_the_base():
    base = torch.full((6, 6), 3, dtype=torch.uint8)
    state = start(_state(base=base), DHRParams(steps=Steps.row(1)))
    assert state.next is None and torch.equal(state.mask, base) and state.mask is not base
    with pytest.raises(ValueError, match="base mask"):
        start(_state(), DHRParams(steps=Steps.row(1)))
    with pytest.raises(ValueError, match="USS"):
        start(_state(uss=None), DHRParams())
    with pytest.raises(ValueError, match="WSS"):
        start(_state(wss=None), DHRParams())
    assert start(_state(uss=None, wss=None), DHRParams(steps=Steps.row(4))).next is Stage.SEED_SCORES


@pytest.mark.parametrize("row", [2, 3, 4])
def test_m_init_is_the_answer_without_steps_2_3(row):
    init = np.array([[3, 3, 5], [5, 0, 255]], np.uint8)
    state = _state(init)
    state.next = Stage.SEED_MASK
    advance(state, DHRParams(steps=Steps.row(row)))
    assert state.next is None and state.classes is None and torch.equal(state.mask, state.init)


def test_one_class_or_one_cell_keeps_m_init_otherwise_gamma_goes_on():
    for init, uss, expected in [(np.full((4, 4), 3, np.uint8), (2, 3, 3), None),  # one class
                                (np.array([[3, 5], [5, 255]], np.uint8), (2, 1, 1), None),  # one feature cell
                                (np.array([[3, 5], [5, 255]], np.uint8), (2, 3, 3), [3, 5])]:
        state = _state(init, uss=uss)
        state.next = Stage.SEED_MASK
        advance(state, DHRParams())
        if expected is None:
            assert state.next is None and torch.equal(state.mask, state.init) and state.mask is not state.init
        else:
            assert state.next is Stage.HEAT_MAPS and state.classes.tolist() == expected
            advance(state, DHRParams())
            assert state.next is Stage.FINAL_MASK
            advance(state, DHRParams())
            assert state.next is None


def test_row_6_works_on_the_first_wss_layers_grid():
    state = _state(np.array([[3, 5], [5, 3]], np.uint8), uss=None, wss=((4, 1, 1), (2, 5, 5)))
    state.next = Stage.SEED_MASK
    advance(state, DHRParams(steps=Steps.row(6)))
    assert state.next is None  # its first layer has one cell


def test_resume_decides_again_for_the_variant_and_shares_step_1():
    seeded = _state(np.array([[3, 5], [5, 3]], np.uint8))
    seeded.next, seeded.warnings, seeded.timings = Stage.SEED_MASK, ["a note of step 1"], {"seed_mask": 1.0}
    full = resume(seeded, DHRParams())
    step1 = resume(seeded, DHRParams(steps=Steps.row(4)))
    assert full.next is Stage.HEAT_MAPS and full.init is seeded.init and full.warnings == [] and full.timings == {}
    assert step1.next is None and torch.equal(step1.mask, seeded.init)
    with pytest.raises(ValueError, match="Step 1"):
        resume(_state(), DHRParams())


def test_step1_settings_hold_what_step_1_reads_and_nothing_else():
    p = DHRParams()
    for same in (p.replace(tau=0.3), p.replace(guard=0.0), p.replace(prototype_weight=0.0), p.replace(marginal_floor=0.2),
                 p.replace(steps=Steps.row(4)), p.replace(marginal_rebalance=Marginal.uniform)):
        assert step1_settings(same) == step1_settings(p)
    for other in (p.replace(rho=0.3), p.replace(gamma=2.0), p.replace(steps=Steps.row(3)), p.replace(ot=OTParams(eps=0.2)),
                  p.replace(crf=CRFParams(iterations=5)), p.replace(marginal_init=Marginal.area)):
        assert step1_settings(other) != step1_settings(p)
    area = p.replace(marginal_init=Marginal.area)
    assert step1_settings(area.replace(marginal_floor=0.2)) != step1_settings(area)  # the floor reaches Step 1 only then


def test_seed_transport_plans_the_step_1_call():
    assert seed_transport(_state(labels=(3,)), DHRParams()) is None  # K = 1
    assert seed_transport(_state(), DHRParams(steps=Steps.row(3))) is None  # OT off
    call = seed_transport(_state(), DHRParams())
    assert call.slots.tolist() == [0, 1] and call.marginal is None and not call.kl
    base = torch.tensor([[3, 3, 3], [5, 0, 0]], dtype=torch.uint8)
    area = seed_transport(_state(base=base), DHRParams(marginal_init=Marginal.area, marginal_floor=0.01))
    np.testing.assert_allclose(area.marginal, [0.75, 0.25], atol=1e-15)


def test_rebalance_transports_one_per_group_then_all_of_gamma():
    state = _state(np.array([[0, 0, 0, 4], [4, 7, 7, 255]], np.uint8))
    state.classes = present_classes(state.init_counts)
    calls, final = rebalance_transports(state, [[1, 2]], DHRParams(marginal_floor=0.01))
    assert [c.slots.tolist() for c in calls] == [[1, 2]] and final.slots.tolist() == [0, 1, 2]
    np.testing.assert_allclose(calls[0].marginal, [0.5, 0.5], atol=1e-15)  # 4 and 7: two pixels each
    np.testing.assert_allclose(final.marginal, [3 / 7, 2 / 7, 2 / 7], atol=1e-15)


def test_wss_maps_are_needed_only_where_used():
    full, paper = DHRParams(), DHRParams(wss_heat_weight=0.0)
    assert needs_wss_maps([], full)  # mixed into Step 2's
    assert not needs_wss_maps([], paper) and needs_wss_maps([[0, 1]], paper)  # the paper: only for a group
    assert needs_wss_maps([], DHRParams(steps=Steps.row(6)))  # WSS alone
    assert not needs_wss_maps([[0, 1]], DHRParams(steps=Steps.row(5)))  # USS alone: never
    assert pipeline.uses_groups(full) and not pipeline.uses_groups(DHRParams(steps=Steps.row(6)))


def test_prototype_rows_pick_gamma_and_refuse_other_features():
    protos = Prototypes(uss=np.arange(12, dtype=np.float32).reshape(6, 2), wss=(np.zeros((6, 4), np.float32),))
    state = _with_classes(_state(np.array([[1, 4], [4, 1]], np.uint8), prototypes=protos), [1, 4])
    uss, wss = prototype_rows(state, DHRParams())
    assert uss.tolist() == [[2, 3], [8, 9]] and len(wss) == 1 and wss[0].shape == (2, 4)
    assert prototype_rows(state, DHRParams(prototype_weight=0.0)) == (None, None)
    with pytest.raises(ValueError, match="dimensions"):
        prototype_rows(_with_classes(_state(np.array([[1, 4]], np.uint8), uss=(3, 3, 3), prototypes=protos), [1, 4]), DHRParams())
    small = Prototypes(uss=np.zeros((3, 2), np.float32), wss=(np.zeros((3, 4), np.float32),))
    with pytest.raises(ValueError, match="3 classes"):
        prototype_rows(_with_classes(_state(np.array([[1, 4]], np.uint8), prototypes=small), [1, 4]), DHRParams())


def _with_classes(state, classes):
    state.classes = np.array(classes)
    return state
