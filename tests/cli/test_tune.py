"""``dhr-label tune``: a grid whose best value is known by construction, balanced folds,
Step 1 computed once per Step-1 setting, resume, and params.json through ``refine --params``."""
from __future__ import annotations

import json

import numpy as np
import pytest
from helpers_h5 import last_run, make_dataset, run_refine
from typer.testing import CliRunner

from dhr_label.cli import app
from dhr_label.core import stages
from dhr_label.core.pipeline import Stage
from dhr_label.io.masks import write_mask
from dhr_label.presets import PRESETS

runner = CliRunner()


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Six generated images whose base masks lost a tag; their truth as ground truth."""
    root = tmp_path_factory.mktemp("tune")
    data = make_dataset(root / "in", 6, size=(24, 32))
    gt = root / "gt"
    gt.mkdir()
    for image_id, record in data.records.items():
        write_mask(gt / f"{image_id}.png", record["truth"], PRESETS["voc"].palette)
    return data, gt


def tune(data, gt, out, *extra):
    return runner.invoke(app, ["tune", "--cams", str(data.cams), "--feats", str(data.feats), "--gt", str(gt),
                               "--out", str(out), "--workers", "1", *extra])


def test_the_best_value_known_by_construction_is_chosen_in_every_fold(labelled, tmp_path):
    data, gt = labelled
    # rho = 0 never restores the tag the base mask lost; rho = 0.5 does (Step 1.5).
    result = tune(data, gt, tmp_path / "tune", "--row", "4", "--grid", "rho=0.0,0.5", "--folds", "3", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["chosen"] == {"rho": 0.5} and report["parameters"]["rho"] == 0.5
    assert [f["chosen"] for f in report["cross_validation"]["per_fold"]] == [{"rho": 0.5}] * 3
    by_rho = {v["settings"]["rho"]: v["scores"]["miou"] for v in report["variants"]}
    assert by_rho[0.5] > by_rho[0.0]
    assert sum(report["fold_sizes"]) == 6 and max(report["fold_sizes"]) - min(report["fold_sizes"]) <= 1
    params = json.loads((tmp_path / "tune" / "params.json").read_text())
    assert params["format"] == "dhr-label/params" and params["parameters"]["steps"]["uss"] is False
    assert sorted(p.name for p in (tmp_path / "tune" / "plots").iterdir()) == ["rho-miou.png", "rho-vanished.png"]
    assert (tmp_path / "tune" / "report.html").read_text().count("<img") == 2


def test_params_json_round_trips_through_refine(labelled, tmp_path):
    data, gt = labelled
    assert tune(data, gt, tmp_path / "tune", "--grid", "tau=0.5,0.9", "--grid", "cap=soft,majority").exit_code == 0
    chosen = json.loads((tmp_path / "tune" / "params.json").read_text())["parameters"]
    out = tmp_path / "masks"
    assert run_refine(data, out, "--params", str(tmp_path / "tune" / "params.json")).exit_code == 0
    assert json.loads((out / "dhr-label-manifest.json").read_text())["parameters"] == chosen
    again = run_refine(data, tmp_path / "flag", "--params", str(tmp_path / "tune" / "params.json"), "--rho", "0.3")
    assert again.exit_code == 0
    recorded = json.loads((tmp_path / "flag" / "dhr-label-manifest.json").read_text())["parameters"]
    assert recorded == {**chosen, "rho": 0.3}  # an explicit option wins over the file
    assert last_run(tmp_path / "flag")["status"] == "complete"


def test_step_1_runs_once_per_step_1_setting(labelled, tmp_path, monkeypatch):
    data, gt = labelled
    calls = []
    real = stages.STAGES[Stage.SEED_MASK]
    monkeypatch.setitem(stages.STAGES, Stage.SEED_MASK, lambda states, *a, **k: calls.append(len(states)) or real(states, *a, **k))
    result = tune(data, gt, tmp_path / "tune", "--grid", "tau=0.5,0.7,0.9", "--grid", "marginal-floor=0.01,0.05")
    assert result.exit_code == 0, result.stderr
    assert len(calls) == 6  # six images, one Step 1 each for six Steps 2-3 variants
    calls.clear()
    assert tune(data, gt, tmp_path / "two", "--grid", "rho=0.3,0.5", "--grid", "tau=0.5,0.9").exit_code == 0
    assert len(calls) == 12  # two Step-1 settings (rho) per image


def test_a_killed_run_resumes_and_other_settings_are_refused(labelled, tmp_path):
    data, gt = labelled
    out = tmp_path / "tune"
    assert tune(data, gt, out, "--grid", "tau=0.5,0.9").exit_code == 0
    first = json.loads((out / "report.json").read_text())
    (out / "images" / "img_002.npz").unlink()  # as if the run had been killed before it
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    again = tune(data, gt, out, "--grid", "tau=0.5,0.9")
    assert again.exit_code == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir() if p.name in stamps} == stamps
    assert json.loads((out / "report.json").read_text())["variants"] == first["variants"]
    other = tune(data, gt, out, "--grid", "tau=0.6")
    assert other.exit_code == 1 and "holds the counts of another tune run" in other.stderr
    assert tune(data, gt, out, "--grid", "tau=0.6", "--overwrite").exit_code == 0


@pytest.mark.parametrize("args, message", [
    (["--grid", "nonsense=1"], "unknown parameter 'nonsense'"),
    (["--grid", "tau"], "expected NAME=V1,V2"),
    (["--grid", "cap=soft,diagonal"], "cap: expected one of soft, majority"),
    (["--sample", "tau=0.9:0.5"], "expected LOW < HIGH"),
    (["--objective", "speed", "--grid", "tau=0.5"], "--objective"),
    ([], "nothing to tune"),
])
def test_usage_errors(labelled, tmp_path, args, message):
    data, gt = labelled
    result = tune(data, gt, tmp_path / "tune", *args)
    assert result.exit_code == 2 and message in result.stderr


def test_random_samples_are_reproducible(labelled, tmp_path):
    data, gt = labelled
    runs = [tune(data, gt, tmp_path / name, "--row", "4", "--sample", "rho=0.1:0.9", "--samples", "3", "--seed", "4", "--json")
            for name in ("a", "b")]
    settings = [[v["settings"] for v in json.loads(r.stdout)["variants"]] for r in runs]
    assert settings[0] == settings[1] and len(settings[0]) == 3
    assert all(0.1 <= s["rho"] <= 0.9 for s in settings[0])


def test_tables_are_not_cut_when_stdout_is_a_pipe(labelled, tmp_path, monkeypatch):
    # As for a user who pipes the table into a file from an 80-column terminal (Rich measures the
    # terminal of any standard stream and would crop the table to it).
    import os

    monkeypatch.setattr(os, "get_terminal_size", lambda fd=0: os.terminal_size((80, 24)))
    data, gt = labelled
    grid = ["--grid", "rho=0.0,0.5", "--grid", "marginal-floor=0.01,0.03", "--grid", "crf-bi-compat=3.5,4.5"]
    result = tune(data, gt, tmp_path / "tune", "--row", "4", *grid, "--folds", "2")
    assert result.exit_code == 0, result.stderr
    chosen = json.loads((tmp_path / "tune" / "report.json").read_text())["chosen"]
    whole = ", ".join(f"{k}={v}" for k, v in chosen.items())  # the setting as the tables write it
    assert len(whole) > 40 and max(map(len, result.stdout.splitlines())) > 80
    folds = result.stdout[result.stdout.index("-fold cross-validation"):]
    assert "chosen on the others" in folds and whole in folds  # the last column, whole


def test_ground_truth_of_other_images_is_named_as_such(labelled, tmp_path):
    data, _ = labelled
    other = tmp_path / "gt-of-others"
    other.mkdir()
    for n in range(4):
        write_mask(other / f"frame_{n:03d}.png", np.zeros((24, 32), np.uint8), PRESETS["voc"].palette)
    result = tune(data, other, tmp_path / "tune", "--grid", "rho=0.0,0.5", "--json")
    assert result.exit_code == 1
    error = json.loads(result.stdout)["error"]
    assert error.startswith(f"none of the 6 images of {data.cams} has a ground truth in {other}: the ids differ")
    assert "img_000" in error and "frame_000" in error
