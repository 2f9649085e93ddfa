"""``dhr-label refine`` end to end on tiny generated HDF5 pairs (issue 2's CLI test, issue 5's
scale edges).

The generated scenes (tests/helpers_h5.py) have a known truth map; the base mask loses one tag
of every image. Full DHR on these clean inputs recovers the truth, which is the known answer
the masks are checked against.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from helpers_h5 import last_run, make_dataset, make_many_groups, masks_in, read_json, run_refine, temporaries
from PIL import Image

from dhr_label.io.contract import CamsFile

MANIFEST = "dhr-label-manifest.json"
# PASCAL VOC colour map entries, from the VOC devkit's documentation (class: RGB).
VOC_COLOURS = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128),
               15: (192, 128, 128), 20: (0, 64, 128), 255: (224, 224, 192)}
ACCURACY = 0.95  # pixel agreement with the scene's truth required of a refined mask


def accuracy(mask: np.ndarray, truth: np.ndarray) -> float:
    return float((mask == truth).mean())


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path / "in", 3, size=(24, 32))


def test_end_to_end_files_palette_ids_and_masks(data, tmp_path):
    out = tmp_path / "masks"
    result = run_refine(data, out)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""  # the summary goes to stderr; stdout is for --json
    assert re.search(r"done\W+3\b", result.stderr)  # the summary table
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted([
        "img_000.png", "img_001.png", "img_002.png", MANIFEST, "dhr-label-prototypes.npz",
    ])
    assert temporaries(out) == []
    for image_id in data.ids:
        record = data.records[image_id]
        with Image.open(out / f"{image_id}.png") as png:
            assert png.mode == "P"
            palette = png.getpalette()
            mask = np.asarray(png)
        for class_id, rgb in VOC_COLOURS.items():
            assert tuple(palette[3 * class_id : 3 * class_id + 3]) == rgb
        assert mask.shape == record["truth"].shape
        assert set(np.unique(mask).tolist()) <= {0, *record["labels"].tolist()}
        lost = int(record["labels"][-1])  # the tag the base mask lost
        assert lost not in record["base"]
        assert lost in mask, "Step 1 restores the tag the base mask lost"
        assert accuracy(mask, record["truth"]) >= ACCURACY > accuracy(record["base"], record["truth"])


def test_second_run_skips_and_overwrite_recomputes(data, tmp_path):
    out = tmp_path / "masks"
    assert run_refine(data, out).exit_code == 0
    first = masks_in(out)
    stats = {i: os.stat(out / f"{i}.png") for i in data.ids}

    again = run_refine(data, out)
    assert again.exit_code == 0
    counts = last_run(out)["counts"]
    assert (counts["done"], counts["skipped"], counts["failed"]) == (0, 3, 0)
    for image_id in data.ids:  # untouched: same inode, same modification time
        now = os.stat(out / f"{image_id}.png")
        assert (now.st_ino, now.st_mtime_ns) == (stats[image_id].st_ino, stats[image_id].st_mtime_ns)

    forced = run_refine(data, out, "--overwrite")
    assert forced.exit_code == 0
    counts = last_run(out)["counts"]
    assert (counts["done"], counts["skipped"]) == (3, 0)
    for image_id in data.ids:  # rewritten by rename: a new inode, the same bytes
        assert os.stat(out / f"{image_id}.png").st_ino != stats[image_id].st_ino
    assert masks_in(out) == first


def test_manifest_records_parameters_inputs_and_counts(data, tmp_path):
    out = tmp_path / "masks"
    result = run_refine(data, out, "--eps", "0.2", "--rho", "0.4", "--cap", "majority")
    assert result.exit_code == 0, result.stderr
    manifest = read_json(out / MANIFEST)
    assert manifest["format"] == "dhr-label/manifest" and manifest["manifest_version"] == 2
    assert manifest["command"] == "refine"
    assert manifest["parameters"]["ot"]["eps"] == 0.2
    assert manifest["parameters"]["rho"] == 0.4
    assert manifest["parameters"]["cap"] == "majority"
    assert manifest["preset"]["name"] == "voc" and manifest["preset"]["background"] == 0
    assert manifest["fingerprint"]["parameters"] == manifest["parameters"]
    (run,) = manifest["runs"]
    assert run["fingerprint_id"] == manifest["fingerprint_id"] and run["status"] == "complete"
    assert run["inputs"]["cams"]["bytes"] == data.cams.stat().st_size
    assert run["inputs"]["feats"]["bytes"] == data.feats.stat().st_size
    assert run["counts"] == {"selected": 3, "done": 3, "skipped": 0, "skipped_other_settings": 0, "failed": 0,
                             "not_run": 0}
    assert run["failures"] == []
    assert run["interrupted"] is False and run["error"] is None


def test_triton_crf_kernels_give_the_eager_masks_and_share_their_fingerprint(data, tmp_path):
    """``--crf-kernels triton`` on the CPU runs the fused kernels under Triton's interpreter
    (tests/conftest.py sets TRITON_INTERPRET=1); 2 CRF iterations keep it quick."""
    pytest.importorskip("triton", reason="Triton is in the test extra")
    from dhr_label.core.crf.fused import TritonStatus, triton_status

    if triton_status() is not TritonStatus.interpreted:
        pytest.skip("this session compiles the Triton kernels for CUDA: they cannot run on CPU tensors")
    common = ("--crf-backend", "torch", "--crf-iters", "2", "--limit", "2")
    eager, fused = tmp_path / "eager", tmp_path / "triton"
    assert run_refine(data, eager, *common, "--crf-kernels", "eager").exit_code == 0
    result = run_refine(data, fused, *common, "--crf-kernels", "triton")
    assert result.exit_code == 0, result.stderr
    assert masks_in(fused).keys() == masks_in(eager).keys() == set(data.ids[:2])
    for image_id in data.ids[:2]:
        np.testing.assert_array_equal(np.asarray(Image.open(fused / f"{image_id}.png")),
                                      np.asarray(Image.open(eager / f"{image_id}.png")))
    assert last_run(fused)["engine"]["crf_kernels"] == "triton"
    assert last_run(eager)["engine"]["crf_kernels"] == "eager"
    assert read_json(fused / MANIFEST)["fingerprint_id"] == read_json(eager / MANIFEST)["fingerprint_id"]
    again = run_refine(data, fused, *common, "--crf-kernels", "eager")  # same masks: kept, not refused
    assert again.exit_code == 0, again.stderr
    assert last_run(fused)["counts"]["skipped"] == 2


def test_crf_kernels_apply_to_the_torch_backend_only(data, tmp_path):
    result = run_refine(data, tmp_path / "masks", "--crf-backend", "pydensecrf", "--crf-kernels", "triton")
    assert result.exit_code == 2
    assert "--crf-kernels triton applies to the torch CRF backend" in result.stderr
    assert not (tmp_path / "masks").exists()


def test_json_summary_is_one_document_on_stdout(data, tmp_path):
    result = run_refine(data, tmp_path / "masks", "--json")
    assert result.exit_code == 0
    summary = json.loads(result.stdout)  # exactly one JSON document
    assert summary["counts"]["done"] == 3
    assert summary["manifest"].endswith(MANIFEST)
    assert "{" not in result.stderr  # the JSON is not on stderr


def test_row_1_writes_the_base_masks_unchanged(data, tmp_path):
    out = tmp_path / "masks"
    assert run_refine(data, out, "--row", "1").exit_code == 0
    for image_id in data.ids:
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{image_id}.png")), data.records[image_id]["base"])


def test_limit_and_ids_select_images(data, tmp_path):
    out = tmp_path / "limited"
    assert run_refine(data, out, "--limit", "2").exit_code == 0
    assert sorted(masks_in(out)) == ["img_000", "img_001"]  # the first ids, sorted
    listed = tmp_path / "ids.txt"
    listed.write_text("# a comment\nimg_002\n\nimg_000\n")
    out = tmp_path / "listed"
    assert run_refine(data, out, "--ids", str(listed)).exit_code == 0
    assert sorted(masks_in(out)) == ["img_000", "img_002"]


def test_camvid_preset_has_no_background_and_its_own_palette(tmp_path):
    data = make_dataset(tmp_path / "in", 2, size=(16, 20), preset="camvid", tags=[0, 3, 8])
    out = tmp_path / "masks"
    result = run_refine(data, out, "--classes", "camvid")
    assert result.exit_code == 0, result.stderr
    with Image.open(out / "img_000.png") as png:
        assert tuple(png.getpalette()[:3]) == (128, 128, 128)  # Sky, SegNet's CamVid colours
        mask = np.asarray(png)
    assert set(np.unique(mask).tolist()) <= {0, 3, 8}
    assert accuracy(mask, data.records["img_000"]["truth"]) >= ACCURACY


# ----------------------------------------------------------------------------------------------
# Scale edges
# ----------------------------------------------------------------------------------------------
EDGES = {
    "1x1 image": dict(size=(1, 1), tags=[5]),
    "8x8 image": dict(size=(8, 8)),
    "one tag": dict(size=(16, 20), tags=[3]),
    "171 classes (stuff)": dict(size=(16, 20), preset="stuff", tags=[0, 170]),
    "30 tags in one image": dict(size=(30, 40), preset="coco", tags=list(range(1, 31))),
    "features larger than the image": dict(size=(16, 20), cam_grid=(32, 40), feat_grid=(64, 80)),
}


@pytest.mark.parametrize("options", EDGES.values(), ids=EDGES.keys())
def test_scale_edges(options, tmp_path):
    data = make_dataset(tmp_path / "in", 1, **options)
    out = tmp_path / "masks"
    result = run_refine(data, out)
    assert result.exit_code == 0, result.stderr
    record = data.records["img_000"]
    mask = np.asarray(Image.open(out / "img_000.png"))
    assert mask.shape == record["truth"].shape
    allowed = set(record["labels"].tolist()) | ({data.background} if data.background is not None else set())
    assert set(np.unique(mask).tolist()) <= allowed
    assert accuracy(mask, record["truth"]) >= ACCURACY
    assert set(np.unique(record["truth"]).tolist()) <= set(np.unique(mask).tolist()), "no class vanished"


# ----------------------------------------------------------------------------------------------
# 100,000 ids: listing them reads no dataset
# ----------------------------------------------------------------------------------------------
N_MANY = 100_000


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    path = tmp_path_factory.mktemp("many") / "data.h5"
    ids = make_many_groups(path, N_MANY)
    return path, ids


def _count_reads(monkeypatch) -> list[str]:
    """Record every image whose CAM is read (the reader of every refined image)."""
    seen: list[str] = []
    original = CamsFile.read_cam

    def spy(self, image_id, *args, **kwargs):
        seen.append(image_id)
        return original(self, image_id, *args, **kwargs)

    monkeypatch.setattr(CamsFile, "read_cam", spy)
    return seen


def test_listing_100k_ids_reads_no_dataset(many, monkeypatch):
    path, ids = many
    reads = _count_reads(monkeypatch)
    with CamsFile.open(path, combined=True) as cams:
        listed = cams.ids()
    assert listed == ids and len(listed) == N_MANY
    assert reads == []


def test_refine_limit_1_on_100k_ids_reads_one_image(many, monkeypatch, tmp_path):
    path, ids = many
    reads = _count_reads(monkeypatch)
    out = tmp_path / "masks"
    # Without class prototypes, whose pass before the run reads every image's base mask and
    # features by design (tests/runtime/test_prototypes.py): here only the selection is at stake.
    cli = ["--cams", str(path), "--feats", str(path), "--out", str(out), "--workers", "1", "--prototype-weight", "0"]
    from typer.testing import CliRunner

    from dhr_label.cli import app

    result = CliRunner().invoke(app, ["refine", *cli, "--limit", "1"])
    assert result.exit_code == 0, result.stderr
    assert reads == [ids[0]]
    assert sorted(masks_in(out)) == [ids[0]]

    wanted = tmp_path / "ids.txt"
    wanted.write_text(f"{ids[-1]}\n{ids[50_000]}\n")
    reads.clear()
    result = CliRunner().invoke(app, ["refine", *cli, "--ids", str(wanted)])
    assert result.exit_code == 0, result.stderr
    assert sorted(reads) == sorted([ids[-1], ids[50_000]])
    assert sorted(masks_in(out)) == sorted([ids[0], ids[50_000], ids[-1]])
