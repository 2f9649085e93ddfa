"""The user's loop: ``refine`` then ``score --gt`` with no other option."""
import json

import numpy as np
from helpers_h5 import make_dataset, run_refine
from PIL import Image
from typer.testing import CliRunner

from dhr_label.cli import app


def _write_gt(directory, data):
    directory.mkdir()
    for image_id, record in data.records.items():
        Image.fromarray(record["truth"]).save(directory / f"{image_id}.png")


def test_score_takes_the_classes_refine_recorded(tmp_path):
    data = make_dataset(tmp_path / "in", n_images=2, preset="camvid")
    out = tmp_path / "masks"
    assert run_refine(data, out).exit_code == 0
    _write_gt(tmp_path / "gt", data)
    result = CliRunner().invoke(app, ["score", "--pred", str(out), "--gt", str(tmp_path / "gt"), "--json", "--workers", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["classes"] == "camvid"
    assert [row["name"] for row in report["per_class"]][:3] == ["Sky", "Building", "Pole"]


def test_score_without_manifest_says_it_assumes_voc(tmp_path):
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    mask = np.zeros((4, 4), dtype=np.uint8)
    for d in ("pred", "gt"):
        Image.fromarray(mask).save(tmp_path / d / "a.png")
    result = CliRunner().invoke(app, ["score", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--json", "--workers", "1"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["classes"] == "voc"
    assert "scoring with the voc classes" in result.stderr
