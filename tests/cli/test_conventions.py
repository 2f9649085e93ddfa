"""Command-line conventions every command keeps: version, help, completion, usage errors (exit 2),
streams (results on stdout, the rest on stderr), checks before work, JSON on failure."""
from __future__ import annotations

import json
import shlex
import subprocess

import numpy as np
import pytest
from helpers_h5 import cli_command, make_dataset, make_records, run_refine, write_cams, write_feats
from PIL import Image
from typer.testing import CliRunner

from dhr_label import __version__
from dhr_label.cli import app
from dhr_label.io.masks import write_mask
from dhr_label.presets import PRESETS

runner = CliRunner()
COMMANDS = ["refine", "score", "inspect", "show", "pack", "merge-manifests", "tune"]


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path / "in", 3, size=(16, 20))


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"dhr-label {__version__}"


@pytest.mark.parametrize("command", [[]] + [[c] for c in COMMANDS])
def test_dash_h_is_help_and_names_no_file_a_user_does_not_have(command):
    short, long = runner.invoke(app, [*command, "-h"]), runner.invoke(app, [*command, "--help"])
    assert short.exit_code == long.exit_code == 0
    assert short.stdout == long.stdout and "Usage: dhr-label" in short.stdout
    for name in ("FORMATS.md", "ALGORITHM.md", "PERFORMANCE-NOTES", "shared/"):
        assert name not in short.stdout


def test_shell_completion_is_offered():
    assert "--install-completion" in runner.invoke(app, ["--help"]).stdout
    # From a bash, as a user types it: typer finds the shell among the process's ancestors
    # (under nohup or a CI runner without one, it would say "Shell not supported").
    command = " ".join(shlex.quote(part) for part in cli_command() + ["--show-completion"])
    result = subprocess.run(["bash", "-c", f"{command}; exit $?"], capture_output=True, text=True, timeout=60)  # no exec: bash stays the parent
    assert result.returncode == 0 and "_DHR_LABEL_COMPLETE" in result.stdout


@pytest.mark.parametrize("args, option", [
    (["--eps", "-1"], "eps must be > 0"),
    (["--rho", "2"], "rho must be in [0, 1]"),
    (["--classes", "no-such-preset"], "--classes"),
    (["--shard", "3/2"], "--shard"),
    (["--ignore-below", "1.5"], "ignore-below must be in [0, 1]"),
])
def test_invalid_option_values_are_usage_errors(data, tmp_path, args, option):
    result = run_refine(data, tmp_path / "out", *args)
    assert result.exit_code == 2, result.stderr
    assert option in result.stderr and "Usage: dhr-label refine" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing was started


def test_score_with_an_unknown_preset_is_a_usage_error(tmp_path):
    (tmp_path / "gt").mkdir()
    result = runner.invoke(app, ["score", "--gt", str(tmp_path / "gt"), "--pred", str(tmp_path / "gt"), "--classes", "nope"])
    assert result.exit_code == 2 and "--classes" in result.stderr


def _scored(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    mask = np.zeros((8, 8), np.uint8)
    mask[:4] = 15
    write_mask(gt / "a.png", mask, PRESETS["voc"].palette)
    write_mask(pred / "a.png", mask, PRESETS["voc"].palette)
    return gt, pred


def test_score_checks_the_csv_directory_before_the_work(tmp_path):
    gt, pred = _scored(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    target = blocker / "csv"  # under a file: cannot be created (as root, too)
    result = runner.invoke(app, ["score", "--gt", str(gt), "--pred", str(pred), "--classes", "voc", "--csv", str(target)])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: --csv {target}: cannot create this directory")
    assert result.stdout == ""  # no score was computed and printed first


def test_show_checks_its_output_directory_before_the_work(tmp_path, data):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    masks = tmp_path / "masks"
    assert run_refine(data, masks, "--row", "1").exit_code == 0
    result = runner.invoke(app, ["show", "--masks", str(masks), "--cams", str(data.cams), "--out", str(blocker / "panels")])
    assert result.exit_code == 1 and f"--out {blocker / 'panels'}: cannot create this directory" in result.stderr


def test_score_json_is_one_document_on_failure_too(tmp_path):
    gt, pred = _scored(tmp_path)
    (pred / "a.png").write_bytes(b"not a png")
    result = runner.invoke(app, ["score", "--gt", str(gt), "--pred", str(pred), "--classes", "voc", "--json"])
    assert result.exit_code == 1
    document = json.loads(result.stdout)  # exactly one document
    assert document["tool"] == "dhr-label score" and "could not be scored" in document["error"]
    assert document["failures"][0]["id"] == "a"
    missing = runner.invoke(app, ["score", "--gt", str(gt), "--pred", str(tmp_path), "--classes", "voc", "--json"])
    assert missing.exit_code == 1 and "no prediction" in json.loads(missing.stdout)["error"]


def test_score_warns_when_classes_differ_from_the_refine_manifest(tmp_path, data):
    out = tmp_path / "masks"
    assert run_refine(data, out, "--row", "1").exit_code == 0  # voc
    gt = tmp_path / "gt"
    gt.mkdir()
    for image_id in data.ids:
        write_mask(gt / f"{image_id}.png", data.records[image_id]["truth"], PRESETS["voc"].palette)
    result = runner.invoke(app, ["score", "--gt", str(gt), "--pred", str(out), "--classes", "coco"])
    assert "warning: --classes coco (81 classes) differs from the classes refine recorded" in result.stderr
    quiet = runner.invoke(app, ["score", "--gt", str(gt), "--pred", str(out), "--classes", "voc"])
    assert quiet.exit_code == 0 and "warning" not in quiet.stderr


def test_a_wrong_size_image_from_images_is_blamed_on_that_file(tmp_path, data):
    images = tmp_path / "images"
    images.mkdir()
    for image_id in data.ids:
        Image.fromarray(data.records[image_id]["image"]).save(images / f"{image_id}.png")
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(images / "img_001.png")  # the wrong size
    result = run_refine(data, tmp_path / "out", "--images", str(images))
    assert result.exit_code == 1
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("failed")]
    assert line.startswith(f"failed img_001: {images / 'img_001.png'}: expected the size of the base mask")
    assert "found 10 x 12" in line


def test_strict_stops_without_a_joblib_warning(tmp_path):
    records = make_records(12, size=(16, 20))
    records["img_002"]["cam"][0, 0, 0] = np.nan
    write_cams(tmp_path / "cams.h5", records, classes=list(PRESETS["voc"].classes), background=0)
    write_feats(tmp_path / "feats.h5", records)
    result = subprocess.run(
        cli_command() + ["refine", "--cams", str(tmp_path / "cams.h5"), "--feats", str(tmp_path / "feats.h5"),
                         "--out", str(tmp_path / "out"), "--workers", "2", "--strict"],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 1
    assert "failed img_002" in result.stderr
    assert "Warning" not in result.stderr and "joblib" not in result.stderr, result.stderr


@pytest.mark.parametrize("args, tool, message", [
    (["refine", "--cams", "{cams}", "--row", "9"], "dhr-label refine", "--row"),  # a value out of range
    (["refine", "--cams", "{cams}", "--eps", "-1"], "dhr-label refine", "eps must be > 0"),  # checked by the command
    (["score", "--gt", "{dir}", "--no-such-option"], "dhr-label score", "No such option: --no-such-option"),
    (["score", "--pred", "{dir}"], "dhr-label score", "Missing option '--gt'"),  # a required option
    (["pack"], "dhr-label pack", "nothing to pack"),  # a rule across options
    (["inspect"], "dhr-label inspect", "Missing argument"),
    (["no-such-command"], "dhr-label", "No such command 'no-such-command'"),
])
def test_json_is_one_document_on_usage_errors_too(data, tmp_path, args, tool, message):
    args = [a.format(cams=data.cams, dir=tmp_path) for a in args]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 2
    document = json.loads(result.stdout)  # exactly one document
    assert document["tool"] == tool and message in document["error"]
    assert message in result.stderr and "Usage: dhr-label" in result.stderr  # Typer's message stays on stderr
    plain = runner.invoke(app, args)
    assert plain.exit_code == 2 and plain.stdout == ""  # without --json, stdout stays empty
