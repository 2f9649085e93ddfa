"""``dhr-label pack``: each pipeline's files written from known arrays, packed, read back."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dhr_label.cli import pack as _pack_command  # noqa: F401  (registers the command)
from dhr_label.cli.app import app
from dhr_label.io.contract import CamsFile, FeatsFile
from dhr_label.io.masks import write_mask
from dhr_label.io.pack import CAM_STYLES, class_ids_of_keys, load_npy, read_cams
from dhr_label.presets import PRESETS, voc_palette

torch = pytest.importorskip("torch")
runner = CliRunner()


def eighths(shape, seed):
    """Values k/8: exact in float16, so the default float16 storage round-trips exactly."""
    return (np.random.default_rng(seed).integers(-32, 32, size=shape) / 8).astype(np.float32)


def pack(*args):
    return runner.invoke(app, ["pack", *map(str, args)])


def save_dict(path, content):
    np.save(path, content, allow_pickle=True)


# -- the class-key conventions ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("keys", "convention", "preset", "expected"),
    [
        ([0, 14], "foreground", "voc", [1, 15]),  # IRN/CLIP-ES/PSA on VOC: id = key + 1
        ([0, 79], "foreground", "coco", [1, 80]),
        ([0, 3, 10], "foreground", "camvid", [0, 3, 10]),  # no background: id = key
        ([1, 15], "class-id", "voc", [1, 15]),
    ],
)
def test_class_ids_of_keys(keys, convention, preset, expected):
    p = PRESETS[preset]
    got = class_ids_of_keys(np.array(keys), convention, num_classes=p.num_classes, background=p.background)
    assert got.tolist() == expected


def test_every_style_counts_keys_without_background():
    assert {s.keys for s in CAM_STYLES.values()} == {"foreground"}


# -- known-answer round trips, one per style -------------------------------------------------
def write_common(tmp_path, ids, hw=(8, 12)):
    """USS .pt, WSS .npy (array for the first id, layers for the others), base PNGs, images."""
    uss_dir, wss_dir, base_dir, img_dir = (tmp_path / n for n in ("uss", "wss", "base", "img"))
    for d in (uss_dir, wss_dir, base_dir, img_dir):
        d.mkdir()
    expected = {}
    for n, image_id in enumerate(ids):
        uss = eighths((4, 4, 6), 10 + n)
        torch.save(torch.from_numpy(uss).half(), uss_dir / f"{image_id}.pt")
        if n == 0:
            wss = eighths((3, 2, 3), 20 + n)
            np.save(wss_dir / f"{image_id}.npy", wss.astype(np.float16))
            wss_layers = [("wss", wss)]
        else:
            c4, c5 = eighths((2, 2, 3), 30 + n), eighths((5, 2, 3), 40 + n)
            save_dict(wss_dir / f"{image_id}.npy", {"C5": torch.from_numpy(c5), "C4": c4})
            wss_layers = [("C4", c4), ("C5", c5)]
        base = np.zeros(hw, dtype=np.uint8)
        base[2:5, 3:7] = 15
        base[0, 0] = 255
        if n == 0:
            write_mask(base_dir / f"{image_id}.png", base, voc_palette())  # palette PNG
        else:
            Image.fromarray(base, mode="L").save(base_dir / f"{image_id}.png")  # grey index PNG
        rgb = np.random.default_rng(50 + n).integers(0, 256, size=(*hw, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(img_dir / f"{image_id}.png")
        expected[image_id] = {"uss": uss, "wss": wss_layers, "base": base, "image": rgb}
    return (uss_dir, wss_dir, base_dir, img_dir), expected


def check_outputs(tmp_path, expected_cams, expected_common):
    with CamsFile.open(tmp_path / "cams.h5") as f:
        assert f.ids() == sorted(expected_cams)
        for image_id, (cam, labels) in expected_cams.items():
            got_cam, got_labels = f.read_cam(image_id)
            assert got_labels.tolist() == labels
            np.testing.assert_array_equal(got_cam, cam)
            np.testing.assert_array_equal(f.read_base(image_id), expected_common[image_id]["base"])
            np.testing.assert_array_equal(f.read_image(image_id), expected_common[image_id]["image"])
    with FeatsFile.open(tmp_path / "feats.h5") as f:
        for image_id, want in expected_common.items():
            np.testing.assert_array_equal(f.read_uss(image_id), want["uss"])
            got = f.read_wss(image_id)
            assert [name for name, _ in got] == [name for name, _ in want["wss"]]
            for (_, a), (_, b) in zip(got, want["wss"]):
                np.testing.assert_array_equal(a, b)


def run_full(tmp_path, cams_dir, style, dirs, *extra):
    uss_dir, wss_dir, base_dir, img_dir = dirs
    return pack(
        "--cams-npy", cams_dir, "--cams-style", style, "--uss-pt", uss_dir, "--wss-npy", wss_dir,
        "--base", base_dir, "--images", img_dir, "--classes", "voc",
        "--out-cams", tmp_path / "cams.h5", "--out-feats", tmp_path / "feats.h5", *extra,
    )


def test_irn_round_trip(tmp_path):
    ids = ["2007_000032", "2007_000039"]
    dirs, common = write_common(tmp_path, ids)
    cams_dir = tmp_path / "irn"
    cams_dir.mkdir()
    # IRN make_cam.py: keys = torch.nonzero(label) (0-based, no background), cam a torch tensor
    # at stride 4, high_res a NumPy array at full size.
    high_a, high_b = eighths((2, 8, 12), 1), eighths((1, 8, 12), 2)
    save_dict(cams_dir / "2007_000032.npy", {"keys": torch.tensor([0, 14]), "cam": torch.from_numpy(high_a[:, ::4, ::4]), "high_res": high_a})
    save_dict(cams_dir / "2007_000039.npy", {"keys": torch.tensor([19]), "cam": torch.from_numpy(high_b[:, ::4, ::4]), "high_res": high_b})
    result = run_full(tmp_path, cams_dir, "irn", dirs)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert "packed" in result.stderr and "failed" in result.stderr
    # aeroplane (key 0) -> VOC 1, person (key 14) -> VOC 15, tvmonitor (key 19) -> VOC 20
    check_outputs(tmp_path, {"2007_000032": (high_a, [1, 15]), "2007_000039": (high_b, [20])}, common)


def test_irn_strided_cam_entry(tmp_path):
    cams_dir = tmp_path / "irn"
    cams_dir.mkdir()
    high = eighths((2, 8, 12), 3)
    save_dict(cams_dir / "a.npy", {"keys": torch.tensor([2, 6]), "cam": torch.from_numpy(high[:, ::4, ::4].copy()), "high_res": high})
    result = pack("--cams-npy", cams_dir, "--cams-style", "irn", "--cams-array", "cam", "--classes", "voc", "--out-cams", tmp_path / "c.h5")
    assert result.exit_code == 0, result.stderr
    with CamsFile.open(tmp_path / "c.h5") as f:
        cam, labels = f.read_cam("a")
    assert labels.tolist() == [3, 7]
    np.testing.assert_array_equal(cam, high[:, ::4, ::4])


def test_clip_es_round_trip(tmp_path):
    ids = ["img1", "img2"]
    dirs, common = write_common(tmp_path, ids)
    cams_dir = tmp_path / "clipes"
    cams_dir.mkdir()
    # keys out of order: channel i belongs to keys[i]; stored sorted by class id
    attn1, attn2 = eighths((2, 8, 12), 4), eighths((3, 8, 12), 5)
    save_dict(cams_dir / "img1.npy", {"keys": np.array([14, 0]), "attn_highres": attn1.astype(np.float16)})
    save_dict(cams_dir / "img2.npy", {"keys": np.array([4, 8, 11]), "attn_highres": attn2.astype(np.float16)})
    result = run_full(tmp_path, cams_dir, "clip-es", dirs)
    assert result.exit_code == 0, result.stderr
    check_outputs(tmp_path, {"img1": (attn1[[1, 0]], [1, 15]), "img2": (attn2, [5, 9, 12])}, common)


def test_psa_round_trip(tmp_path):
    ids = ["p1", "p2"]
    dirs, common = write_common(tmp_path, ids)
    cams_dir = tmp_path / "psa"
    cams_dir.mkdir()
    m = eighths((3, 8, 12), 6)
    save_dict(cams_dir / "p1.npy", {11: m[0], 2: m[1]})  # PSA infer_cls.py: {class index (no bg): H x W}
    save_dict(cams_dir / "p2.npy", {np.int64(0): m[2]})
    result = run_full(tmp_path, cams_dir, "psa", dirs)
    assert result.exit_code == 0, result.stderr
    check_outputs(tmp_path, {"p1": (m[[1, 0]], [3, 12]), "p2": (m[2:3], [1])}, common)


def test_no_background_dataset_and_class_id_keys(tmp_path):
    cams_dir = tmp_path / "irn"
    cams_dir.mkdir()
    high = eighths((2, 4, 4), 7)
    save_dict(cams_dir / "f1.npy", {"keys": torch.tensor([0, 3]), "high_res": high})
    result = pack("--cams-npy", cams_dir, "--cams-style", "irn", "--classes", "camvid", "--out-cams", tmp_path / "cv.h5")
    assert result.exit_code == 0, result.stderr
    with CamsFile.open(tmp_path / "cv.h5") as f:
        assert f.read_cam("f1")[1].tolist() == [0, 3]  # CamVid has no background: id = key
    result = pack("--cams-npy", cams_dir, "--cams-style", "irn", "--cams-keys", "class-id", "--classes", "voc", "--out-cams", tmp_path / "v.h5")
    assert result.exit_code == 1
    assert "f1: " in result.stderr and "must not include the background id 0" in result.stderr


def test_float32_option_and_combined_output(tmp_path):
    cams_dir, uss_dir = tmp_path / "clip", tmp_path / "uss"
    cams_dir.mkdir()
    uss_dir.mkdir()
    cam = np.full((1, 2, 2), 0.1, dtype=np.float32)
    save_dict(cams_dir / "a.npy", {"keys": np.array([0]), "attn_highres": cam})
    torch.save(torch.full((2, 2, 2), 0.1), uss_dir / "a.pt")
    both = tmp_path / "both.h5"
    result = pack("--cams-npy", cams_dir, "--cams-style", "clip-es", "--uss-pt", uss_dir, "--classes", "voc",
                  "--out-cams", both, "--out-feats", both, "--dtype", "float32")
    assert result.exit_code == 0, result.stderr
    with CamsFile.open(both, combined=True) as f:
        assert f.read_cam("a")[0][0, 0, 0] == np.float32(0.1)
    with FeatsFile.open(both, combined=True) as f:
        assert f.read_uss("a")[0, 0, 0] == np.float32(0.1)


# -- error policy, resume, JSON --------------------------------------------------------------
def test_malformed_inputs_are_reported_with_their_path_and_the_run_goes_on(tmp_path):
    cams_dir, base_dir = tmp_path / "irn", tmp_path / "base"
    cams_dir.mkdir()
    base_dir.mkdir()
    for image_id in ("good", "nobase"):
        save_dict(cams_dir / f"{image_id}.npy", {"keys": torch.tensor([0]), "high_res": np.ones((1, 4, 4))})
    (cams_dir / "corrupt.npy").write_bytes(b"\x93NUMPY garbage")
    save_dict(cams_dir / "nokeys.npy", {"high_res": np.ones((1, 4, 4))})
    save_dict(cams_dir / "badkey.npy", {"keys": np.array([20]), "high_res": np.ones((1, 4, 4))})
    for image_id in ("good", "corrupt", "nokeys", "badkey"):
        write_mask(base_dir / f"{image_id}.png", np.zeros((4, 4), np.uint8), voc_palette())
    out = tmp_path / "cams.h5"
    result = pack("--cams-npy", cams_dir, "--cams-style", "irn", "--base", base_dir, "--classes", "voc", "--out-cams", out, "--json")
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("failed ")]
    assert len(lines) == 4
    assert f"failed corrupt: {cams_dir / 'corrupt.npy'}: cannot be read" in result.stderr
    assert f"failed nokeys: {cams_dir / 'nokeys.npy'}: expected entries ['keys'] (irn style), found ['high_res']" in result.stderr
    assert f"failed badkey: {cams_dir / 'badkey.npy'}: entry 'keys': expected foreground indices in [0, 20)" in result.stderr
    assert f"failed nobase: {base_dir / 'nobase.png'}: file not found" in result.stderr
    summary = json.loads(result.stdout)
    assert summary["counts"] == {"images": 5, "packed": 1, "skipped": 0, "failed": 4, "not_run": 0}
    assert sorted(f["id"] for f in summary["failures"]) == ["badkey", "corrupt", "nobase", "nokeys"]
    with CamsFile.open(out) as f:
        assert f.ids() == ["good"]
    # --strict stops at the first failure (ids are visited in sorted order: badkey first)
    result = pack("--cams-npy", cams_dir, "--cams-style", "irn", "--base", base_dir, "--classes", "voc", "--out-cams", out, "--json", "--strict")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["counts"] == {"images": 5, "packed": 0, "skipped": 0, "failed": 1, "not_run": 4}


def test_rerun_resumes_and_appends(tmp_path):
    cams_dir = tmp_path / "psa"
    cams_dir.mkdir()
    save_dict(cams_dir / "a.npy", {0: np.ones((4, 4))})
    out = tmp_path / "cams.h5"
    args = ("--cams-npy", cams_dir, "--cams-style", "psa", "--out-cams", out, "--json", "--classes")
    assert json.loads(pack(*args, "voc").stdout)["counts"]["packed"] == 1
    save_dict(cams_dir / "b.npy", {1: np.ones((4, 4))})
    result = pack(*args, "voc")
    assert result.exit_code == 0
    counts = json.loads(result.stdout)["counts"]
    assert (counts["packed"], counts["skipped"]) == (1, 1)
    result = pack(*args, "camvid")
    assert result.exit_code == 1
    assert "cannot append: the file's classes" in result.stderr


def test_ids_file_selects_and_a_listed_id_without_files_fails(tmp_path):
    uss_dir = tmp_path / "uss"
    uss_dir.mkdir()
    for image_id in ("a", "b"):
        torch.save(torch.ones(2, 2, 2), uss_dir / f"{image_id}.pt")
    (tmp_path / "ids.txt").write_text("b\nzz\n")
    result = pack("--uss-pt", uss_dir, "--ids", tmp_path / "ids.txt", "--out-feats", tmp_path / "f.h5", "--json")
    assert result.exit_code == 1
    assert f"failed zz: {uss_dir / 'zz.pt'}: file not found" in result.stderr
    with FeatsFile.open(tmp_path / "f.h5") as f:
        assert f.ids() == ["b"]


def test_feature_file_problems(tmp_path):
    uss_dir = tmp_path / "uss"
    uss_dir.mkdir()
    torch.save(torch.ones(2, 2), uss_dir / "flat.pt")
    torch.save({"feat": torch.ones(2, 2, 2)}, uss_dir / "dict.pt")
    torch.save(torch.full((1, 2, 2), 1e6), uss_dir / "huge.pt")
    result = pack("--uss-pt", uss_dir, "--out-feats", tmp_path / "f.h5")
    assert result.exit_code == 1
    assert f"failed flat: {uss_dir / 'flat.pt'}: features: expected shape [D, h, w] with every size >= 1, found [2, 2]" in result.stderr
    assert f"failed dict: {uss_dir / 'dict.pt'}: features: expected a [D, h, w] tensor or array, found dict" in result.stderr
    assert "failed huge: " in result.stderr and "overflow float16" in result.stderr


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickles_that_would_run_code_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.npy"
    save_dict(path, {"keys": np.array([0]), "high_res": _Payload()})
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle"):
        load_npy(path)
    p = PRESETS["voc"]
    with pytest.raises(Exception, match="cannot be read: UnpicklingError: refusing to unpickle"):
        read_cams(path, "evil", CAM_STYLES["irn"], num_classes=p.num_classes, background=p.background)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cams-npy", "{d}", "--cams-style", "irn", "--out-cams", "c.h5"], "--cams-npy needs --classes"),
        (["--cams-npy", "{d}", "--cams-style", "psa", "--cams-array", "x", "--classes", "voc", "--out-cams", "c.h5"],
         "--cams-array does not apply to --cams-style psa"),
        (["--uss-pt", "{d}"], "--uss-pt / --wss-npy need --out-feats"),
        (["--uss-pt", "{d}", "--out-feats", "f.h5", "--base", "{d}"], "--base concern CAMs: give --cams-npy too"),
        ([], "nothing to pack"),
    ],
)
def test_usage_errors_exit_2(tmp_path, args, message):
    result = pack(*[a.replace("{d}", str(tmp_path)) for a in args])
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stdout == ""


# -- output folders and image directories ------------------------------------------------------
def _irn_files(tmp_path, ids):
    cams_dir = tmp_path / "irn"
    cams_dir.mkdir()
    for n, image_id in enumerate(ids):
        high = eighths((1, 8, 12), 60 + n)
        save_dict(cams_dir / f"{image_id}.npy",
                  {"keys": torch.tensor([14]), "cam": torch.from_numpy(high[:, ::4, ::4]), "high_res": high})
    return cams_dir


def test_pack_creates_the_folders_of_its_outputs(tmp_path):
    ids = ["a", "b"]
    dirs, _ = write_common(tmp_path, ids)
    uss_dir, _, _, img_dir = dirs
    cams, feats = tmp_path / "packed" / "cams.h5", tmp_path / "packed" / "deeper" / "feats.h5"
    result = pack("--cams-npy", _irn_files(tmp_path, ids), "--cams-style", "irn", "--images", img_dir, "--classes", "voc",
                  "--uss-pt", uss_dir, "--out-cams", cams, "--out-feats", feats)
    assert result.exit_code == 0, result.stderr
    with CamsFile.open(cams) as c, FeatsFile.open(feats) as f:
        assert c.ids() == f.ids() == ids


def test_an_image_directory_without_the_images_is_one_message(tmp_path):
    ids = ["a", "b", "c"]
    wrong = tmp_path / "elsewhere"
    wrong.mkdir()
    Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(wrong / "unrelated.png")
    result = pack("--cams-npy", _irn_files(tmp_path, ids), "--cams-style", "irn", "--images", wrong, "--classes", "voc",
                  "--out-cams", tmp_path / "cams.h5", "--json")
    assert result.exit_code == 1
    assert result.stderr.count("error:") == 1 and "failed" not in result.stderr
    error = json.loads(result.stdout)["error"]
    assert f"--images {wrong}: no <id>.jpg|.jpeg|.png of any of the 3 ids to pack (first: a)" in error
    assert not (tmp_path / "cams.h5").exists()
