"""DHRParams defaults (docs/algorithm.md), validation, the Table 6 switches."""
import dataclasses
import json

import pytest

from dhr_label.params import ABLATION_ROWS, CapMode, CRFBackend, CRFKernels, CRFParams, DHRParams, Marginal, OTParams, Steps


def test_defaults_are_algorithm_md():
    p = DHRParams()
    assert (p.ot.eps, p.ot.tol, p.ot.max_iter, p.ot.minmax_clip) == (0.1, 1e-5, 1000, 1e-5)
    assert dataclasses.astuple(p.crf) == (10, 1.0, 3.0, 67.0, 3.0, 4.0, 1e-5, CRFBackend.pydensecrf, CRFKernels.auto)
    assert (p.gamma, p.rho, p.tau) == (1.0, 0.5, 0.8)
    assert p.cap is CapMode.soft
    assert p.marginal_init is Marginal.uniform and p.marginal_rebalance is Marginal.area
    assert (p.marginal_floor, p.marginal_kl) == (0.03, 0.1)  # the floor: 0.01 until 0.3 (our measured change)
    assert (p.guard, p.guard_support, p.guard_max_share) == (0.5, 0.15, 1.0)  # ours
    assert p.steps == Steps() == ABLATION_ROWS[7]


def test_crf_kernels_stay_out_of_the_recorded_parameters_but_survive_copies():
    """How the torch CRF computes is not what decides a mask (the same marginals bit for bit):
    manifests and fingerprints leave it out; copies of the parameters keep it."""
    p = DHRParams(crf=CRFParams(backend=CRFBackend.torch, kernels="triton"))
    assert "kernels" not in p.to_dict()["crf"] and p.to_dict()["crf"]["backend"] == "torch"
    assert DHRParams.from_dict(p.to_dict()).crf.kernels is CRFKernels.auto
    assert p.with_values({"tau": 0.5}).crf.kernels is CRFKernels.triton
    assert p.with_values({"crf.kernels": "eager"}).crf.kernels is CRFKernels.eager


def test_ablation_rows_match_table_6():
    # (init, ot, crf, uss, wss) per row.
    table = {
        1: (False, False, False, False, False),
        2: (True, True, False, False, False),
        3: (True, False, True, False, False),
        4: (True, True, True, False, False),
        5: (True, True, True, True, False),
        6: (True, True, True, False, True),
        7: (True, True, True, True, True),
    }
    assert sorted(ABLATION_ROWS) == list(table)
    for row, switches in table.items():
        steps = Steps.row(row)
        assert dataclasses.astuple(steps) == switches
        assert steps.rebalance == (row >= 5)


@pytest.mark.parametrize("row", [0, 8, -1])
def test_unknown_row_is_refused(row):
    with pytest.raises(ValueError, match=f"1..7, got {row}"):
        Steps.row(row)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"ot": OTParams(eps=0.0)}, "eps must be > 0, got 0.0"),
        ({"ot": OTParams(tol=-1.0)}, "tol must be > 0"),
        ({"ot": OTParams(max_iter=0)}, "max_iter must be >= 1, got 0"),
        ({"rho": 1.5}, r"rho must be in \[0, 1\], got 1.5"),
        ({"tau": -0.1}, r"tau must be in \[0, 1\]"),
        ({"gamma": 0.0}, "gamma must be > 0"),
        ({"marginal_floor": 0.0}, r"marginal floor must be in \(0, 1\), got 0.0"),
        ({"marginal_floor": 1.0}, r"marginal floor must be in \(0, 1\)"),
        ({"marginal_kl": 0.0}, "KL weight must be > 0"),
        ({"crf": CRFParams(iterations=-1)}, "CRF iterations must be >= 0, got -1"),
    ],
)
def test_bad_values_are_refused_with_expected_and_found(changes, match):
    with pytest.raises(ValueError, match=match):
        DHRParams(**changes)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ValueError, match="rho .*; tau .*; gamma"):
        DHRParams(rho=2.0, tau=2.0, gamma=-1.0)


def test_boundary_values_are_accepted_and_kept():
    low = DHRParams(rho=0.0, tau=1.0, crf=CRFParams(iterations=0), marginal_floor=1e-9)
    high = DHRParams(rho=1.0, tau=0.0)
    assert (low.rho, low.tau, low.crf.iterations, low.marginal_floor, high.rho, high.tau) == (0.0, 1.0, 0, 1e-9, 1.0, 0.0)


def test_frozen_and_replace_validates():
    p = DHRParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.rho = 0.3
    q = p.replace(rho=0.3, steps=Steps.row(4))
    assert (q.rho, q.steps, p.rho) == (0.3, ABLATION_ROWS[4], 0.5)
    with pytest.raises(ValueError, match="rho"):
        p.replace(rho=-1.0)


def test_to_dict_is_plain_json():
    d = DHRParams(cap=CapMode.majority, marginal_rebalance=Marginal.unbalanced).to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["cap"] == "majority" and d["marginal_rebalance"] == "unbalanced"
    assert d["steps"] == {"init": True, "ot": True, "crf": True, "uss": True, "wss": True}
    assert d["crf"]["bilateral_sxy"] == 67.0 and d["ot"]["eps"] == 0.1


@pytest.mark.parametrize("name", ["prototype_weight", "wss_heat_weight"])
@pytest.mark.parametrize("value", [-0.1, 1.1])
def test_our_weights_are_checked(name, value):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        DHRParams(**{name: value})
