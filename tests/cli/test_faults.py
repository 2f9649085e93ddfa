"""Fault injection for ``dhr-label refine`` (issue 5): every broken input is built on the fly.

Per-image faults must fail that image alone (one line naming the id, the file and dataset,
expected vs found; the manifest lists it; the run goes on; exit 1; no mask, no temporary),
inputs that can be adapted must be adapted and noted, and file-level faults must stop the run
with one clear line, exit 1 and no traceback.
"""
from __future__ import annotations

import errno
import os
import re
import resource
import signal
import subprocess

import h5py
import numpy as np
import pytest
from helpers_h5 import (
    cli_command,
    last_run,
    make_dataset,
    make_records,
    masks_in,
    pixels_in,
    refine_args,
    run_refine,
    temporaries,
)
from PIL import Image

import dhr_label.io.atomic as atomic

MANIFEST = "dhr-label-manifest.json"
LOCKS = [".dhr-label.gate", ".dhr-label.lock", ".dhr-label.run.lock"]
SIZE = (16, 20)  # image; CAMs and features are 8 x 10 (80 cells)
TAGS = [4, 9]  # every image's tags: the expected messages quote them


def records(**options):
    return make_records(3, size=SIZE, tags=TAGS, num_classes=21, background=0, **options)


def broken_dataset(tmp_path, damage):
    """Three images; ``damage(record)`` breaks img_001 in place."""
    recs = records()
    damage(recs["img_001"])
    return make_dataset(tmp_path / "in", records=recs)


def failure_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("failed ")]


def assert_only_img_001_failed(result, out, where: str, expected: list[str]) -> str:
    """The run went on, img_001 failed with one precise line, and nothing of it was written."""
    assert result.exit_code == 1, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = failure_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith(f"failed img_001: {where}: "), line
    for text in expected:
        assert text in line, (text, line)
    manifest = last_run(out)
    assert manifest["failures"] == [{"id": "img_001", "reason": line[len("failed img_001: "):]}]
    assert manifest["counts"]["done"] == 2 and manifest["counts"]["failed"] == 1
    assert sorted(masks_in(out)) == ["img_000", "img_002"]
    assert temporaries(out) == []
    return line


def _set(key, value):
    def damage(record):
        record[key] = value(record) if callable(value) else value
    return damage


def _poke(key, index, value):
    def damage(record):
        record[key][index] = value
    return damage


PER_IMAGE = {
    "cam 2-D": (_set("cam", lambda r: r["cam"][0]), "cam", ["expected shape [K, h, w]", "found [8, 10]"]),
    "cam NaN": (_poke("cam", (0, 1, 1), np.nan), "cam", ["expected finite values, found 1 NaN/Inf"]),
    "cam Inf": (_set("cam", lambda r: np.where(np.arange(10) < 2, np.inf, r["cam"]).astype(np.float32)),
                "cam", ["expected finite values, found 32 NaN/Inf"]),  # 2 columns x 8 rows x 2 channels
    "labels out of range": (_set("labels", np.array([4, 21])), "labels", ["expected class ids in [0, 21)", "found [4, 21]"]),
    "labels duplicated": (_set("labels", np.array([4, 4])), "labels", ["expected unique ascending tags", "found [4, 4]"]),
    "labels unsorted": (_set("labels", np.array([9, 4])), "labels", ["expected unique ascending tags", "found [9, 4]"]),
    "background among tags": (_set("labels", np.array([0, 9])), "labels", ["background id 0", "found [0, 9]"]),
    "K of cam != K of labels": (_set("labels", np.array([4])), "labels", ["expected 2 tags (one per cam channel), found 1"]),
    "labels float": (_set("labels", np.array([4.0, 9.0])), "labels", ["expected an integer dtype, found float64"]),
    "base wrong size": (_set("base", lambda r: r["base"][:-1]), "base", ["expected a 16 x 20 mask", "found 15 x 20"]),
    "base id outside classes": (_poke("base", (0, 0), 40), "base", ["expected class ids in [0, 21) or 255", "found [40]"]),
    "missing cam": (_set("cam", None), "cam", ["required dataset is missing"]),
    "missing image": (lambda r: r.pop("image"), "image", ["no image in the file and no --images directory given"]),
    "image 5 channels": (_set("image", lambda r: np.zeros(SIZE + (5,), np.uint8)), "image", ["expected shape [H, W, 3]", "found [16, 20, 5]"]),
    "image float": (_set("image", lambda r: r["image"].astype(np.float32)), "image", ["expected uint8 (or uint16) values, found float32"]),
    "missing uss": (_set("uss", None), "uss", ["required dataset is missing"]),
    "missing wss": (_set("wss", None), "wss", ["required dataset is missing"]),
    "zero uss vectors": (_set("uss", lambda r: np.zeros_like(r["uss"])), "uss", ["every feature vector is zero"]),
    "zero wss layer": (_set("wss", lambda r: {**r["wss"], "C4": np.zeros_like(r["wss"]["C4"])}), "wss/C4", ["every feature vector is zero"]),
    "uss integer": (_set("uss", lambda r: np.ones(r["uss"].shape, np.int32)), "uss", ["expected a float dtype, found int32"]),
    "uss wrong aspect": (_set("uss", lambda r: r["uss"][:, :2]), "uss", ["a 2 x 10 map does not fit", "16 x 20 image"]),
}
FILE_OF = {"cam": "cams", "labels": "cams", "base": "cams", "image": "cams"}


@pytest.mark.parametrize("damage, dataset, expected", PER_IMAGE.values(), ids=PER_IMAGE.keys())
def test_a_bad_image_fails_alone(damage, dataset, expected, tmp_path):
    data = broken_dataset(tmp_path, damage)
    out = tmp_path / "out"
    result = run_refine(data, out)
    path = data.cams if FILE_OF.get(dataset.split("/")[0]) == "cams" else data.feats
    assert_only_img_001_failed(result, out, f"{path}:/img_001/{dataset}", expected)


def test_an_id_absent_from_the_feats_file_fails_alone(tmp_path):
    recs = records()
    data = make_dataset(tmp_path / "in", records=recs)
    with h5py.File(data.feats, "a") as handle:
        del handle["img_001"]
    out = tmp_path / "out"
    assert_only_img_001_failed(run_refine(data, out), out, str(data.feats), ["no group /img_001 in this file"])


def test_a_corrupt_compressed_chunk_fails_alone(tmp_path):
    data = make_dataset(tmp_path / "in", records=records())
    with h5py.File(data.feats, "a") as handle:
        uss = handle["img_001/uss"][()]
        del handle["img_001/uss"]
        dataset = handle.create_dataset("img_001/uss", data=uss, chunks=uss.shape, compression="gzip")
        chunk = dataset.id.get_chunk_info(0)
    with open(data.feats, "r+b") as raw:  # overwrite the compressed bytes with garbage
        raw.seek(chunk.byte_offset)
        raw.write(b"\xff" * chunk.size)
    out = tmp_path / "out"
    assert_only_img_001_failed(
        run_refine(data, out), out, f"{data.feats}:/img_001/uss", ["dataset cannot be read (truncated or corrupt)"]
    )


def test_missing_files_in_the_image_and_base_directories_fail_alone(tmp_path):
    recs = records()
    data = make_dataset(tmp_path / "in", records=recs)
    images, bases = tmp_path / "images", tmp_path / "bases"
    images.mkdir()
    bases.mkdir()
    for image_id in ("img_000", "img_002"):
        Image.fromarray(recs[image_id]["image"]).save(images / f"{image_id}.png")
        Image.fromarray(recs[image_id]["base"]).save(bases / f"{image_id}.png")
    Image.fromarray(recs["img_001"]["base"]).save(bases / "img_001.png")
    out = tmp_path / "out"
    result = run_refine(data, out, "--images", str(images), "--base", str(bases))
    assert_only_img_001_failed(result, out, str(images), ["no image img_001.jpg|.jpeg|.png in this directory"])

    Image.fromarray(recs["img_001"]["image"]).save(images / "img_001.png")
    (bases / "img_001.png").unlink()
    out = tmp_path / "out2"
    result = run_refine(data, out, "--images", str(images), "--base", str(bases))
    assert_only_img_001_failed(result, out, str(bases), ["no base mask img_001.png in this directory"])


def test_an_rgb_rendering_as_base_mask_fails_alone(tmp_path):
    recs = records()
    data = make_dataset(tmp_path / "in", records=recs)
    bases = tmp_path / "bases"
    bases.mkdir()
    for image_id, record in recs.items():
        Image.fromarray(record["base"]).save(bases / f"{image_id}.png")
    Image.fromarray(recs["img_001"]["image"]).save(bases / "img_001.png")  # RGB, not class ids
    out = tmp_path / "out"
    result = run_refine(data, out, "--base", str(bases))
    assert_only_img_001_failed(result, out, str(bases / "img_001.png"), ["mode P or L", "found mode RGB"])


def test_strict_stops_at_the_first_failure(tmp_path):
    data = broken_dataset(tmp_path, _poke("cam", (0, 0, 0), np.nan))
    out = tmp_path / "out"
    result = run_refine(data, out, "--strict")
    assert result.exit_code == 1
    manifest = last_run(out)
    assert manifest["strict_stop"] is True
    assert manifest["counts"] == {"selected": 3, "done": 1, "skipped": 0, "skipped_other_settings": 0, "failed": 1,
                                  "not_run": 1}
    assert sorted(masks_in(out)) == ["img_000"]  # ids run in sorted order with one worker
    assert [f["id"] for f in manifest["failures"]] == ["img_001"]


# ----------------------------------------------------------------------------------------------
# Inputs that are adapted, and noted, instead of failing
# ----------------------------------------------------------------------------------------------
def _clean_masks(tmp_path) -> dict[str, bytes]:
    data = make_dataset(tmp_path / "clean", records=records())
    assert run_refine(data, tmp_path / "clean-out").exit_code == 0
    return pixels_in(tmp_path / "clean-out")


def _rgba(record):
    record["image"] = np.concatenate([record["image"], np.full(SIZE + (1,), 77, np.uint8)], axis=2)


def _sixteen_bit(record):
    record["image"] = record["image"].astype(np.uint16) * 257  # scales back exactly


HANDLED_SAME = {  # conversions that lose nothing: the mask must be the clean input's
    "RGBA image": (_rgba, "image: RGBA: alpha dropped"),
    "16-bit image": (_sixteen_bit, "image: 16-bit values scaled to 8 bits"),
    "float64 uss": (_set("uss", lambda r: r["uss"].astype(np.float64)), "uss: float64 read as float32"),
    "float64 wss layer": (_set("wss", lambda r: {**r["wss"], "C5": r["wss"]["C5"].astype(np.float64)}),
                          "wss/C5: float64 read as float32"),
    "float64 cam": (_set("cam", lambda r: r["cam"].astype(np.float64)), "cam: float64 read as float32"),
}


@pytest.mark.parametrize("damage, note", HANDLED_SAME.values(), ids=HANDLED_SAME.keys())
def test_lossless_conversions_are_noted_and_change_nothing(damage, note, tmp_path):
    clean = _clean_masks(tmp_path)
    data = broken_dataset(tmp_path, damage)
    out = tmp_path / "out"
    result = run_refine(data, out)
    assert result.exit_code == 0, result.stderr
    assert note in last_run(out)["notes"]["img_001"]
    assert pixels_in(out) == clean


HANDLED = {
    "grey image [H, W]": (_set("image", lambda r: r["image"][:, :, 1]), "image: grey copied to R, G, B"),
    "grey image [H, W, 1]": (_set("image", lambda r: r["image"][:, :, 1:2]), "image: grey copied to R, G, B"),
    "one NaN feature cell": (_poke("uss", (3, 2, 5), np.nan), "uss: 1 of 80 cells held NaN/Inf and were zeroed"),
    "a tag that is never activated": (_poke("cam", 1, -1.0), "cam: tag(s) [9] never positive: no seed for them"),
}


@pytest.mark.parametrize("damage, note", HANDLED.values(), ids=HANDLED.keys())
def test_adaptable_inputs_are_noted_not_failed(damage, note, tmp_path):
    data = broken_dataset(tmp_path, damage)
    out = tmp_path / "out"
    result = run_refine(data, out)
    assert result.exit_code == 0, result.stderr
    assert note in last_run(out)["notes"]["img_001"]
    assert sorted(masks_in(out)) == data.ids
    assert "with notes" in result.stderr


def test_image_files_in_other_modes_are_converted_and_noted(tmp_path):
    clean = _clean_masks(tmp_path)
    recs = records()
    data = make_dataset(tmp_path / "in", records=recs)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(recs["img_000"]["image"]).convert("RGBA").save(images / "img_000.png")
    Image.fromarray(recs["img_001"]["image"]).save(images / "img_001.png")
    grey16 = recs["img_002"]["image"][:, :, 0].astype(np.uint16) * 257
    Image.fromarray(grey16).save(images / "img_002.png")
    out = tmp_path / "out"
    result = run_refine(data, out, "--images", str(images))
    assert result.exit_code == 0, result.stderr
    notes = last_run(out)["notes"]
    assert "image img_000.png: RGBA: alpha dropped" in notes["img_000"]
    assert "image img_002.png: 16-bit values scaled to 8 bits, grey copied to R, G, B" in notes["img_002"]
    assert not any(n.startswith("image") for n in notes.get("img_001", []))
    masks = pixels_in(out)
    assert masks["img_000"] == clean["img_000"] and masks["img_001"] == clean["img_001"]


# ----------------------------------------------------------------------------------------------
# Odd ids
# ----------------------------------------------------------------------------------------------
def test_ids_outside_the_character_rule_fail_alone(tmp_path):
    odd = ["a b", "[bold]x", "caf\u00e9", "x;rm"]
    recs = make_records(len(odd) + 1, size=SIZE, tags=TAGS, ids=["ok_1"] + odd)
    data = make_dataset(tmp_path / "in", records=recs)
    out = tmp_path / "out"
    result = run_refine(data, out)
    assert result.exit_code == 1
    failures = {f["id"]: f["reason"] for f in last_run(out)["failures"]}
    assert sorted(failures) == sorted(odd)
    for image_id, reason in failures.items():
        assert reason == f"{data.cams}: image id may hold only letters, digits, '_', '-' and '.'"
        assert f"failed {image_id}: {reason}" in result.stderr  # printed as is, [bold] included
    assert sorted(p.name for p in out.glob("*.png")) == ["ok_1.png"]


def test_an_id_too_long_for_a_file_name_fails_alone(tmp_path):
    long_id = "a" * 250  # legal characters; "<id>.png" exceeds the 255-byte name limit
    recs = make_records(2, size=SIZE, tags=TAGS, ids=["ok_1", long_id])
    data = make_dataset(tmp_path / "in", records=recs)
    out = tmp_path / "out"
    result = run_refine(data, out)
    assert result.exit_code == 1
    manifest = last_run(out)
    assert [f["id"] for f in manifest["failures"]] == [long_id]
    assert "File name too long" in manifest["failures"][0]["reason"]
    assert manifest["error"] is None  # one image's problem, not the directory's: the run went on
    assert sorted(masks_in(out)) == ["ok_1"]
    assert temporaries(out) == []


# ----------------------------------------------------------------------------------------------
# File-level faults: one line, exit 1, no traceback, nothing written
# ----------------------------------------------------------------------------------------------
def _copy_with_attr(source, target, **attrs):
    target.write_bytes(source.read_bytes())
    with h5py.File(target, "a") as handle:
        for key, value in attrs.items():
            handle.attrs[key] = value
    return target


def _without_images(source, target):
    """A valid file of ``source``'s kind and attributes that holds no image group."""
    with h5py.File(source, "r") as original, h5py.File(target, "w") as handle:
        handle.attrs.update(original.attrs)
    return target


FILE_FAULTS = {
    "no image": (lambda d, t: _without_images(d.cams, t / "none.h5"), "cams", "holds no image (no group at its root)"),
    "feats with no image": (lambda d, t: _without_images(d.feats, t / "none.h5"), "feats", "holds no image"),
    "missing": (lambda d, t: t / "nope.h5", "cams", "does not exist"),
    "empty": (lambda d, t: (t / "empty.h5", (t / "empty.h5").write_bytes(b""))[0], "cams", "is empty (0 bytes)"),
    "not HDF5": (lambda d, t: (t / "x.h5", (t / "x.h5").write_bytes(b"PK\x03\x04" * 64))[0], "cams",
                 "is not an HDF5 file (no HDF5 signature in its 256 bytes)"),
    "truncated": (lambda d, t: (t / "cut.h5", (t / "cut.h5").write_bytes(d.cams.read_bytes()[:4096]))[0], "cams",
                  "is truncated: 4096 of its"),
    "wrong format": (lambda d, t: _copy_with_attr(d.cams, t / "f.h5", format="dhr-label/masks"), "cams",
                     "root attribute 'format' should be 'dhr-label/cams', found 'dhr-label/masks'"),
    "unsupported version": (lambda d, t: _copy_with_attr(d.cams, t / "v.h5", version=2), "cams",
                            "contract version 2 is not supported (this dhr-label reads version 1)"),
    "feats given as cams": (lambda d, t: _copy_with_attr(d.feats, t / "feats-copy.h5"), "cams",
                            "root attribute 'format' should be 'dhr-label/cams', found 'dhr-label/feats'"),
    "feats missing": (lambda d, t: t / "nope.h5", "feats", "does not exist"),
    "feats truncated": (lambda d, t: (t / "cut.h5", (t / "cut.h5").write_bytes(d.feats.read_bytes()[:2048]))[0],
                        "feats", "is truncated: 2048 of its"),
}


@pytest.mark.parametrize("make, which, expected", FILE_FAULTS.values(), ids=FILE_FAULTS.keys())
def test_file_level_faults_stop_with_one_line(make, which, expected, tmp_path):
    data = make_dataset(tmp_path / "in", records=records())
    bad = make(data, tmp_path)
    cams, feats = (bad, data.feats) if which == "cams" else (data.cams, bad)
    from typer.testing import CliRunner

    from dhr_label.cli import app

    out = tmp_path / "out"
    args = ["refine", "--cams", str(cams), "--feats", str(feats), "--out", str(out), "--workers", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr  # one line
    assert result.stderr.startswith(f"error: {which} file {bad}")
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_images_found_nowhere_are_one_message_not_one_failure_per_image(tmp_path):
    data = make_dataset(tmp_path / "in", records=records(with_image=False))
    out = tmp_path / "out"
    result = run_refine(data, out)
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "failed" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"error: no image for any of the {len(data.ids)} selected ids (first: img_000): "
                                    f"the cams file {data.cams} holds no image dataset for them and no --images DIR was given")
    assert not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_refine(data, out, "--images", str(empty))
    assert result.exit_code == 1 and f"the --images directory {empty} holds no <id>.jpg|.jpeg|.png of them" in result.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes files whatever their mode")
def test_an_unreadable_file_and_an_unwritable_directory(tmp_path):
    data = make_dataset(tmp_path / "in", records=records())
    data.cams.chmod(0)
    result = run_refine(data, tmp_path / "out")
    assert result.exit_code == 1 and "Permission denied" in result.stderr and "Traceback" not in result.stderr
    data.cams.chmod(0o644)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    result = run_refine(data, locked)
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: the output directory {locked} is not writable"


def test_an_output_directory_that_cannot_be_created(tmp_path):
    data = make_dataset(tmp_path / "in", records=records())
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = run_refine(data, blocker / "masks")
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: cannot create the output directory {blocker / 'masks'}: Not a directory"


def test_debug_shows_the_traceback_of_a_file_level_fault(tmp_path):
    data = make_dataset(tmp_path / "in", records=records())
    data.cams.write_bytes(b"")
    result = run_refine(data, tmp_path / "out", root=("--debug",))
    assert result.exit_code == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.rstrip().endswith(f"error: cams file {data.cams} is empty (0 bytes)")


def test_debug_shows_the_traceback_of_an_unexpected_error(tmp_path, monkeypatch):
    import dhr_label.runtime.refine.run as refine_run

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(refine_run, "select_ids", broken)
    data = make_dataset(tmp_path / "in", records=records())
    plain = run_refine(data, tmp_path / "out")
    assert plain.exit_code == 1
    assert plain.stderr.strip() == "error: unexpected RuntimeError: boom (run with --debug for the traceback)"
    debug = run_refine(data, tmp_path / "out", root=("--debug",))
    assert debug.exit_code == 1
    assert "Traceback (most recent call last)" in debug.stderr and "RuntimeError: boom" in debug.stderr


# ----------------------------------------------------------------------------------------------
# A full disk: the run stops with one message, and no partial mask remains under any name
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, first", [
    (("--prototype-weight", "0"), "img_000.png"),  # the first mask
    ((), "dhr-label-prototypes.npz"),  # the class prototypes, pooled before the images
])
def test_a_full_disk_stops_the_run_without_partial_files(tmp_path, monkeypatch, extra, first):
    real, writes = atomic._write_file, []

    def disk_full(path, data):  # the run's first write (its manifest) fits; then the disk is full
        writes.append(path)
        if len(writes) == 1:
            return real(path, data)
        with open(path, "wb") as handle:  # writes half, as a real full disk does, then fails
            handle.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(atomic, "_write_file", disk_full)
    data = make_dataset(tmp_path / "in", records=records())
    out = tmp_path / "out"
    result = run_refine(data, out, *extra)
    assert result.exit_code == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: cannot write {out / first}: No space left on device; "
        f"cannot write the manifest {out / MANIFEST}: No space left on device"
    ]
    failed = 1 if first.startswith("img") else 0  # a mask that could not be written is a failed image
    assert re.search(rf"failed\W+{failed}\b", result.stderr) and re.search(rf"not run\W+{3 - failed}\b", result.stderr)
    assert sorted(p.name for p in out.iterdir()) == LOCKS + [MANIFEST]  # the manifest of the start
    assert last_run(out)["status"] == "running"  # what the full disk let the run record


def _limit_file_size(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
    return apply


def test_a_real_write_limit_in_a_subprocess_stops_the_run_before_any_mask(tmp_path):
    data = make_dataset(tmp_path / "in", records=records())
    out = tmp_path / "out"
    out.mkdir()
    # 400 bytes: the lock files fit; the manifest the run writes before its first mask does not.
    run = subprocess.run(
        cli_command() + refine_args(data, out), capture_output=True, text=True, timeout=120,
        preexec_fn=_limit_file_size(400),
    )
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    assert run.stderr.strip() == f"error: cannot write the manifest {out / MANIFEST}: File too large"
    assert sorted(p.name for p in out.iterdir()) == LOCKS
