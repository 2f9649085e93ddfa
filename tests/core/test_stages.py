"""The scheduler: a batch of states through the stages, one CRF per group of images, an image's
mask the same alone or in any batch, with either CRF backend."""
import pytest
import torch

from dhr_label.core import stages
from dhr_label.core.pipeline import Stage, new_state, resume, start
from dhr_label.core.stages import CRFCache, run_stages
from dhr_label.params import CapMode, CRFBackend, CRFParams, DHRParams, Marginal, Steps

from .scenes import batch_scenes


def states_of(cases, params, device="cpu"):
    return [start(new_state(c["cam"], c["labels"], c["image"], c["base"], c["uss"], c["wss"], 0, device=device), params)
            for c in cases]


SETTINGS = {"full": DHRParams(), "groups": DHRParams(tau=0.5, cap=CapMode.majority), "area-init": DHRParams(marginal_init=Marginal.area),
            "row4": DHRParams(steps=Steps.row(4)), "row6": DHRParams(steps=Steps.row(6)), "row2": DHRParams(steps=Steps.row(2)),
            # guard 1.0: every class Steps 2-3 moved at all is guarded, so these scenes exercise it
            "guard": DHRParams(guard=1.0), "guard-whole-region": DHRParams(guard=1.0, guard_support=0.0),
            "torch-crf": DHRParams(crf=CRFParams(backend=CRFBackend.torch))}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_an_images_mask_does_not_depend_on_its_batch(device, name):
    params = SETTINGS[name]
    cases = batch_scenes()[: 3 if name == "torch-crf" else 4]  # the torch CRF is the slow one on a CPU
    together = run_stages(states_of(cases, params, device), params)
    for case, state in zip(cases, together):
        (alone,) = run_stages(states_of([case], params, device), params)
        assert torch.equal(alone.mask, state.mask) and torch.equal(alone.init, state.init)
        assert alone.restored == state.restored and alone.groups == state.groups
        if alone.heat is not None:
            torch.testing.assert_close(alone.heat, state.heat, atol=1e-12, rtol=0)
        assert state.mask.device.type == torch.device(device).type
    if name == "full":
        assert [s.groups for s in together if s.groups] == [[[2, 5]], [[4, 6]]]  # the siblings, where present
        assert together[0].restored == [9]  # the tag its base mask lost


def test_the_two_crf_passes_share_one_crf_and_timings_are_kept(monkeypatch):
    built = []
    real = stages.image_crfs
    monkeypatch.setattr(stages, "image_crfs", lambda images, *a, **k: built.append(len(images)) or real(images, *a, **k))
    cases = batch_scenes()[:3]
    states = run_stages(states_of(cases, DHRParams()), DHRParams())
    assert built == [3]
    assert all(set(s.timings) == {"seed_scores", "seed_mask", "heat_maps", "final_mask"} for s in states)


def test_until_stops_before_a_stage_and_a_resumed_variant_reuses_the_crf(monkeypatch):
    params = DHRParams()
    cases = batch_scenes()[:1]
    crfs = CRFCache(params.crf)
    (seeded,) = run_stages(states_of(cases, params), params, crfs=crfs, until=Stage.HEAT_MAPS)
    assert seeded.next is Stage.HEAT_MAPS and seeded.mask is None and seeded.init is not None
    monkeypatch.setattr(stages, "image_crfs", lambda *a, **k: pytest.fail("the image's CRF is built again"))
    for variant in (params, params.replace(tau=0.5), params.replace(steps=Steps.row(4))):
        (done,) = run_stages([resume(seeded, variant)], variant, crfs=crfs)
        assert done.mask is not None and done.next is None


def test_a_resumed_variant_gives_the_mask_of_a_run_from_the_start():
    cases = batch_scenes()[:2]
    first, second = DHRParams(), DHRParams(tau=0.5, guard=1.0)
    seeded = run_stages(states_of(cases, first), first, until=Stage.HEAT_MAPS)
    resumed = run_stages([resume(s, second) for s in seeded], second)
    direct = run_stages(states_of(cases, second), second)
    for r, d in zip(resumed, direct):
        assert torch.equal(r.mask, d.mask)


def test_images_that_stop_after_step_1_leave_the_others_going():
    cases = batch_scenes()
    params = DHRParams()
    states = states_of(cases, params)
    states[1].uss = states[1].uss[:, :1, :1]  # one feature cell: M_init is its answer
    run_stages(states, params)
    assert torch.equal(states[1].mask, states[1].init) and states[1].heat is None
    assert all(s.heat is not None for b, s in enumerate(states) if b != 1)


def test_ignore_below_blanks_uncertain_pixels():
    cases = batch_scenes(seed=13)[:2]
    plain = run_stages(states_of(cases, DHRParams()), DHRParams())
    unsure = run_stages(states_of(cases, DHRParams(ignore_below=0.9)), DHRParams(ignore_below=0.9))
    for p, u in zip(plain, unsure):
        keep = p.confidence >= 0.9
        assert torch.equal(u.mask[keep], p.mask[keep]) and bool((u.mask[~keep] == 255).all())
        assert 0 < int((~keep).sum()) < keep.numel()  # the threshold bites, and not everywhere


def test_nothing_to_do_is_not_an_error():
    assert run_stages([], DHRParams()) == []
