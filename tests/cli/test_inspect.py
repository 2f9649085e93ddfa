"""``dhr-label inspect`` on tiny generated files, valid and deliberately broken."""
import json

import h5py
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dhr_label.cli import app
from dhr_label.io.masks import write_mask
from dhr_label.presets import PRESETS, classes_json

runner = CliRunner()
VOC = PRESETS["voc"]
H, W = 8, 12


def base_mask():
    base = np.zeros((H, W), np.uint8)
    base[:, 6:] = 15  # person on the right half
    base[0, :3] = 1  # three aeroplane pixels
    base[7, 0] = 255
    return base


def make_inputs(tmp_path, ids=("a", "b", "c"), *, same_file=False):
    """A valid cams.h5 + feats.h5 pair in the v1 contract: VOC classes, tags aeroplane and person."""
    rng = np.random.default_rng(0)
    cams_path, feats_path = tmp_path / "cams.h5", tmp_path / ("cams.h5" if same_file else "feats.h5")
    with h5py.File(cams_path, "w") as f:
        f.attrs.update(format="dhr-label/cams", version=1, classes=classes_json(VOC), background=0,
                       ignore_index=255)
        for i in ids:
            g = f.create_group(i)
            g["cam"] = rng.random((2, 4, 6)).astype(np.float32)
            g["labels"] = np.array([1, 15])
            g["base"] = base_mask()
            g["image"] = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    mode = "a" if same_file else "w"
    with h5py.File(feats_path, mode) as f:
        if not same_file:
            f.attrs.update(format="dhr-label/feats", version=1)
        for i in ids:
            g = f.require_group(i)
            g["uss"] = rng.random((5, 4, 6)).astype(np.float16)
            g["wss/C4"] = rng.random((3, 4, 6)).astype(np.float32)
            g["wss/C5"] = rng.random((4, 2, 3)).astype(np.float32)
    return cams_path, feats_path


def inspect(*args):
    return runner.invoke(app, ["inspect", *map(str, args)])


def test_valid_files_pass_with_a_summary(tmp_path):
    cams, feats = make_inputs(tmp_path)
    result = inspect(cams, feats)
    assert result.exit_code == 0, result.stderr
    assert "classes: 21 (preset voc)" in result.stdout
    assert "8 x 12 (3)" in result.stdout
    assert "ok: 3 images" in result.stderr and "error" not in result.stderr
    report = json.loads(inspect(cams, feats, "--json").stdout)
    assert report["images"] == 3 and report["errors"] == 0
    assert report["image_sizes"] == {"8 x 12": 3}
    assert report["datasets"]["uss"] == {"5 x 4 x 6 float16": 3}
    assert report["datasets"]["wss/C5"] == {"4 x 2 x 3 float32": 3}
    assert report["datasets"]["cam"] == {"K x 4 x 6 float32": 3}
    assert report["tags_per_image"] == {"2": 3}
    freq = {row["name"]: row for row in report["class_frequency"]}
    assert freq["aeroplane"]["tagged_images"] == 3 and freq["background"]["tagged_images"] == 0
    # per image: 95 labelled pixels = 45 background + 3 aeroplane + 48 person, one ignore
    assert freq["person"]["base_pixel_share"] == pytest.approx(48 / 96)
    assert freq["aeroplane"]["base_pixel_share"] == pytest.approx(3 / 96)
    assert report["base_ignore_share"] == pytest.approx(1 / 96)
    assert [f["path"] for f in report["files"]] == [str(cams), str(feats)]


def test_one_file_holding_both_sides(tmp_path):
    cams, _ = make_inputs(tmp_path, same_file=True)
    result = inspect(cams, cams)
    assert result.exit_code == 0, result.stderr


def test_broken_images_are_listed_with_id_and_reason(tmp_path):
    cams, feats = make_inputs(tmp_path, ids=("a", "b", "c", "d", "e"))
    with h5py.File(cams, "a") as f:
        f["a/cam"][0, 0, 0] = np.nan
        del f["b/labels"]
        f["b/labels"] = np.array([1, 40])
        del f["c/base"]
        f["c/base"] = np.zeros((H + 1, W), np.uint8)
        del f["d/image"]
    with h5py.File(feats, "a") as f:
        f.create_group("extra")["uss"] = np.zeros((5, 4, 6), np.float32)
        del f["e/uss"]
    result = inspect(cams, feats)
    assert result.exit_code == 1
    err = result.stderr
    assert "a: " in err and "NaN" in err
    assert "b: " in err and "[1, 40]" in err
    assert "c: " in err and "9 x 12" in err
    assert "d: " in err and "no image" in err
    assert "e: " in err and "uss" in err and "missing" in err
    assert "extra: " in err and "no group /extra" in err
    assert "6 errors concerning 6 ids (5 images in cams.h5)" in err
    assert "Traceback" not in err
    report = json.loads(inspect(cams, feats, "--json").stdout)
    assert sorted(f["id"] for f in report["findings"] if f["severity"] == "error") == [
        "a", "b", "c", "d", "e", "extra"]
    assert report["counts"]["readable"] == 0


def test_wrong_format_attribute_is_one_clear_line(tmp_path):
    cams, feats = make_inputs(tmp_path)
    with h5py.File(feats, "a") as f:
        f.attrs["format"] = "something-else"
    result = inspect(cams, feats)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "something-else" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_not_hdf5_is_one_clear_line(tmp_path):
    bogus = tmp_path / "cams.h5"
    bogus.write_bytes(b"not an hdf5 file at all")
    result = inspect(bogus)
    assert result.exit_code == 1 and "HDF5" in result.stderr and "Traceback" not in result.stderr


def test_classes_must_match_the_preset(tmp_path):
    cams, feats = make_inputs(tmp_path)
    result = inspect(cams, feats, "--classes", "camvid")
    assert result.exit_code == 1
    assert "do not match preset 'camvid'" in result.stderr


def test_features_not_required_without_feats(tmp_path):
    cams, _ = make_inputs(tmp_path)
    with h5py.File(cams, "a") as f:
        del f["a/cam"]
        f["a/cam"] = np.ones((2, 4, 6), np.float16)
    result = inspect(cams)
    assert result.exit_code == 0, result.stderr
    report = json.loads(inspect(cams, "--json").stdout)
    assert report["datasets"]["cam"] == {"K x 4 x 6 float32": 2, "K x 4 x 6 float16": 1}


def test_directories_missing_an_image_or_a_base_mask(tmp_path):
    cams, feats = make_inputs(tmp_path)
    images, base = tmp_path / "images", tmp_path / "base"
    images.mkdir()
    base.mkdir()
    for i in ("a", "b"):
        Image.new("RGB", (W, H)).save(images / f"{i}.jpg")
    for i in ("a", "c"):
        write_mask(base / f"{i}.png", base_mask(), VOC.palette)
    result = inspect(cams, feats, "--images", images, "--base", base)
    assert result.exit_code == 1
    assert "c: " in result.stderr and "no image c.jpg" in result.stderr
    assert "b: " in result.stderr and "no base mask b.png" in result.stderr


def test_nan_feature_cells_are_a_warning_not_an_error(tmp_path):
    cams, feats = make_inputs(tmp_path)
    with h5py.File(feats, "a") as f:
        f["a/uss"][:, 0, 0] = np.nan
    result = inspect(cams, feats)
    assert result.exit_code == 0, result.stderr
    assert "warning:" in result.stderr and "NaN" in result.stderr


def test_a_file_with_no_image_is_an_error(tmp_path):
    cams, feats = make_inputs(tmp_path, ids=())
    result = inspect(cams, feats, "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["images"] == 0 and report["errors"] == 1
    [finding] = report["findings"]
    assert finding["id"] is None and finding["source"] == str(cams) and "holds no image" in finding["problem"]
    assert f"error: {cams}: holds no image" in result.stderr
    assert "ok:" not in result.stderr and "error: 1 errors (0 images in cams.h5)" in result.stderr
