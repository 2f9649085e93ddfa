"""The reader of the HDF5 contract (dhr_label.io.contract), on tiny files written here with h5py:
opening (format, version, damage), which paths are one file, ids, and every dataset's checks.

An image's errors are :class:`InputError` naming the id, the file and dataset, expected vs found;
a file's are one :class:`FileLevelError` line naming the file. The CLI tests (tests/cli/test_faults.py,
test_inspect.py) check what the user sees of them; these pin the module's own answers.
"""
from __future__ import annotations

import fcntl
import json
import os

import h5py
import numpy as np
import pytest

from dhr_label.errors import FileLevelError, InputError
from dhr_label.io.contract import EMPTY, INCOMPLETE_ATTR, CamsFile, FeatsFile, as_rgb_uint8, check_id, one_file

CLASSES = ["background", "cat", "dog", "bird"]  # background 0; images are tagged cat and bird
CAMS_ATTRS = {"format": "dhr-label/cams", "version": 1, "classes": json.dumps(CLASSES), "background": 0,
              "ignore_index": 255}
FEATS_ATTRS = {"format": "dhr-label/feats", "version": 1}
CAM = np.arange(12, dtype=np.float32).reshape(2, 2, 3) / 4 - 1  # exact in float16 and float32
IMAGE = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
BASE = np.array([[0, 1, 1, 3, 3, 255]] * 4, dtype=np.uint8)
USS = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3) + 1


def write(path, attrs: dict, groups: dict) -> str:
    """An HDF5 file with root ``attrs`` and one group per id: name -> array, or -> {layer: array}
    for a group of datasets, or an array at the root for an id that is a dataset."""
    with h5py.File(path, "w") as handle:
        handle.attrs.update(attrs)
        for image_id, content in groups.items():
            if not isinstance(content, dict):
                handle.create_dataset(image_id, data=content)
                continue
            group = handle.create_group(image_id)
            for name, value in content.items():
                if isinstance(value, dict):
                    layers = group.create_group(name)
                    for layer, array in value.items():
                        layers.create_dataset(layer, data=array)
                else:
                    group.create_dataset(name, data=value)
    return str(path)


def cams(tmp_path, *, name="cams.h5", **datasets):
    """A cams file holding image ``x`` (the good datasets, replaced or removed (None) by
    ``datasets``), opened."""
    content = {"cam": CAM, "labels": np.array([1, 3]), "base": BASE, "image": IMAGE, **datasets}
    path = write(tmp_path / name, CAMS_ATTRS, {"x": {k: v for k, v in content.items() if v is not None}})
    return CamsFile.open(path)


def feats(tmp_path, **datasets):
    """A feats file holding image ``x`` (a good uss and two wss layers, replaced or removed by
    ``datasets``), opened."""
    content = {"uss": USS, "wss": {"C5": USS * 2, "C4": USS}, **datasets}
    path = write(tmp_path / "feats.h5", FEATS_ATTRS, {"x": {k: v for k, v in content.items() if v is not None}})
    return FeatsFile.open(path)


def refused(call, source: str, *expected: str, image_id: str = "x") -> InputError:
    """Run ``call``; it must raise an InputError of ``image_id`` at ``source`` whose problem
    holds each of ``expected``."""
    with pytest.raises(InputError) as caught:
        call()
    error = caught.value
    assert (error.image_id, error.source) == (image_id, source)
    for text in expected:
        assert text in error.problem, (text, error.problem)
    assert str(error) == f"{image_id}: {source}: {error.problem}"
    return error


# ----------------------------------------------------------------------------------------------
# Opening a file
# ----------------------------------------------------------------------------------------------
def test_a_good_pair_opens_and_says_what_it_holds(tmp_path):
    with cams(tmp_path) as c:
        assert (c.classes, c.num_classes, c.background, c.ignore_index, c.version) == (CLASSES, 4, 0, 255, 1)
        assert c.summary() == {"path": str(tmp_path / "cams.h5"), "bytes": (tmp_path / "cams.h5").stat().st_size,
                               "format": "dhr-label/cams", "version": 1, "groups": 1}
    with feats(tmp_path) as f:
        assert f.summary()["format"] == "dhr-label/feats"


def test_attributes_written_as_fixed_length_bytes_are_read_as_text(tmp_path):
    # Another tool's writer (h5py with np.bytes_, MATLAB, C) stores ASCII strings, not UTF-8 text.
    attrs = {**CAMS_ATTRS, "format": np.bytes_("dhr-label/cams"), "classes": np.bytes_(json.dumps(CLASSES))}
    with CamsFile.open(write(tmp_path / "c.h5", attrs, {})) as c:
        assert c.classes == CLASSES and c.summary()["format"] == "dhr-label/cams"


def test_no_background_is_minus_one(tmp_path):
    with CamsFile.open(write(tmp_path / "c.h5", {**CAMS_ATTRS, "background": -1}, {})) as c:
        assert c.background is None


def _bytes(data: bytes):
    return lambda path: path.write_bytes(data)


OPEN_FAULTS = {
    "missing": (lambda path: None, "does not exist"),
    "a directory": (lambda path: path.mkdir(), "is a directory, expected an HDF5 file"),
    "empty": (_bytes(b""), "is empty (0 bytes)"),
    "not HDF5": (_bytes(b"PK\x03\x04" * 25), "is not an HDF5 file (no HDF5 signature in its 100 bytes)"),
    "no format": (lambda path: write(path, {"version": 1}, {}), "root attribute 'format' should be 'dhr-label/cams', found None"),
    "another format": (lambda path: write(path, {**CAMS_ATTRS, "format": "dhr-label/masks"}, {}),
                       "root attribute 'format' should be 'dhr-label/cams', found 'dhr-label/masks'"),
    "the feats format": (lambda path: write(path, FEATS_ATTRS, {}),
                         "root attribute 'format' should be 'dhr-label/cams', found 'dhr-label/feats'"),
    "no version": (lambda path: write(path, {"format": "dhr-label/cams"}, {}),
                   "root attribute 'version' should be an integer, found None"),
    "version not a number": (lambda path: write(path, {**CAMS_ATTRS, "version": "one"}, {}),
                             "root attribute 'version' should be an integer, found 'one'"),
    "version 2": (lambda path: write(path, {**CAMS_ATTRS, "version": 2}, {}),
                  "contract version 2 is not supported (this dhr-label reads version 1)"),
    "classes not JSON": (lambda path: write(path, {**CAMS_ATTRS, "classes": "cat, dog"}, {}),
                         "root attribute 'classes' should be a JSON list of class names, found 'cat, dog'"),
    "classes not names": (lambda path: write(path, {**CAMS_ATTRS, "classes": "[1, 2]"}, {}),
                          "should be a JSON list of class names, found '[1, 2]'"),
    "no class": (lambda path: write(path, {**CAMS_ATTRS, "classes": "[]"}, {}), "found '[]'"),
    "256 classes": (lambda path: write(path, {**CAMS_ATTRS, "classes": json.dumps([f"c{i}" for i in range(256)])}, {}),
                    "at most 255 classes fit an 8-bit mask, found 256"),
    "background not a class": (lambda path: write(path, {**CAMS_ATTRS, "background": 4}, {}),
                               "'background' should be -1 or a class id below 4, found 4"),
    "background not a number": (lambda path: write(path, {**CAMS_ATTRS, "background": "none"}, {}),
                                "'background' and 'ignore_index' must be integers"),
    "ignore index a class": (lambda path: write(path, {**CAMS_ATTRS, "ignore_index": 3}, {}),
                             "'ignore_index' should be in [4, 255], found 3"),
    "ignore index past 8 bits": (lambda path: write(path, {**CAMS_ATTRS, "ignore_index": 256}, {}),
                                 "'ignore_index' should be in [4, 255], found 256"),
}


@pytest.mark.parametrize("make, expected", OPEN_FAULTS.values(), ids=OPEN_FAULTS.keys())
def test_a_file_that_cannot_be_read_as_cams_is_one_line_naming_it(make, expected, tmp_path):
    path = tmp_path / "in.h5"
    make(path)
    with pytest.raises(FileLevelError) as caught:
        CamsFile.open(path)
    message = str(caught.value)
    assert message.startswith(f"cams file {path}") and expected in message, message
    assert "\n" not in message
    if path.is_file() and path.stat().st_size > 100:  # an HDF5 file it refused is closed again
        with h5py.File(path, "a") as handle:
            handle.attrs["touched"] = 1


def test_a_truncated_file_says_how_much_of_it_is_there(tmp_path):
    whole = tmp_path / "whole.h5"
    write(whole, CAMS_ATTRS, {"x": {"cam": np.ones((2, 64, 64), np.float32), "labels": np.array([1, 3])}})
    data = whole.read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(FileLevelError) as caught:
        CamsFile.open(cut)
    assert str(caught.value) == (f"cams file {cut} is truncated: {len(data) // 2} of its {len(data)} bytes are present "
                                 "(was its writer interrupted?)")


def test_a_file_locked_by_a_writer_says_so(tmp_path, monkeypatch):
    monkeypatch.delenv("HDF5_USE_FILE_LOCKING", raising=False)  # HDF5's default: lock
    path = write(tmp_path / "c.h5", CAMS_ATTRS, {})
    with open(path, "rb") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a writer in another process holds it
        with pytest.raises(FileLevelError, match="is locked by another process .*HDF5_USE_FILE_LOCKING=FALSE"):
            CamsFile.open(path)


def test_the_feats_side_names_itself(tmp_path):
    path = write(tmp_path / "f.h5", CAMS_ATTRS, {})
    with pytest.raises(FileLevelError) as caught:
        FeatsFile.open(path)
    assert str(caught.value) == f"feats file {path}: root attribute 'format' should be 'dhr-label/feats', found 'dhr-label/cams'"


def test_one_file_holding_both_sides_opens_as_feats_when_combined(tmp_path):
    path = write(tmp_path / "both.h5", CAMS_ATTRS, {"x": {"cam": CAM, "labels": np.array([1, 3]), "uss": USS}})
    with FeatsFile.open(path, combined=True) as f, CamsFile.open(path, combined=True) as c:
        np.testing.assert_array_equal(f.read_uss("x"), USS)
        assert c.read_cam("x")[1].tolist() == [1, 3]
    with pytest.raises(FileLevelError, match="found 'dhr-label/cams'"):
        FeatsFile.open(path)
    with pytest.raises(FileLevelError, match="found 'dhr-label/masks'"):  # combined takes either side's, no other
        FeatsFile.open(write(tmp_path / "m.h5", {**CAMS_ATTRS, "format": "dhr-label/masks"}, {}), combined=True)


# ----------------------------------------------------------------------------------------------
# Which paths are one file
# ----------------------------------------------------------------------------------------------
def test_one_file_through_every_spelling_and_link(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    x = tmp_path / "x.h5"
    x.write_bytes(b"")
    (tmp_path / "link.h5").symlink_to(x)
    os.link(x, tmp_path / "hard.h5")
    (tmp_path / "y.h5").write_bytes(b"")
    assert one_file(x, x) and one_file(str(x), x)
    assert one_file(tmp_path / "a" / ".." / "x.h5", x)
    monkeypatch.chdir(tmp_path / "a")
    assert one_file("../x.h5", x)  # relative to the working directory, as a worker sees it
    assert one_file(tmp_path / "link.h5", x) and one_file(x, tmp_path / "link.h5")
    assert one_file(tmp_path / "hard.h5", x)
    assert not one_file(tmp_path / "y.h5", x)  # same bytes, another file
    assert not one_file(tmp_path / "missing.h5", x) and not one_file(x, tmp_path / "missing.h5")
    assert not one_file(x, None) and not one_file(None, x)


# ----------------------------------------------------------------------------------------------
# Ids and groups
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("image_id", ["2007_000032", "a.b-c_D9", "..a"])
def test_ids_of_letters_digits_and_three_marks_pass(image_id):
    assert check_id(image_id, "cams.h5") is None


@pytest.mark.parametrize("image_id", ["a b", "a/b", ".", "..", "", "caf\u00e9", "x;rm", "a\nb"])
def test_other_ids_are_refused_naming_id_and_file(image_id):
    with pytest.raises(InputError) as caught:
        check_id(image_id, "cams.h5")
    assert (caught.value.image_id, caught.value.source) == (image_id, "cams.h5")
    assert caught.value.problem == "image id may hold only letters, digits, '_', '-' and '.'"


def test_an_id_ending_in_a_newline_is_refused():
    # "a\n" would name a group, then a mask file "a\n.png" (io/ids.py's is_valid_id refuses it).
    with pytest.raises(InputError, match="image id may hold only letters"):
        check_id("a\n", "cams.h5")


def test_ids_are_sorted_and_listed_without_reading(tmp_path):
    good = {"cam": CAM, "labels": np.array([1, 3])}
    path = write(tmp_path / "c.h5", CAMS_ATTRS, {"b": good, "a": {**good, "image": IMAGE}, "c": good})
    with CamsFile.open(path) as c:
        assert c.ids() == c.require_images() == ["a", "b", "c"]
        assert "b" in c and "z" not in c
        assert c.has("a", "image") and not c.has("b", "image") and not c.has("z", "cam")


def test_a_file_with_no_image_is_refused_when_images_are_required(tmp_path):
    path = write(tmp_path / "c.h5", CAMS_ATTRS, {})
    with CamsFile.open(path) as c:
        assert c.ids() == []
        with pytest.raises(FileLevelError) as caught:
            c.require_images()
    assert str(caught.value) == f"cams file {path} {EMPTY}"
    assert "holds no image" in EMPTY and "dhr-label pack" in EMPTY


def test_layout_lists_datasets_and_layers_without_reading(tmp_path):
    with feats(tmp_path) as f:
        assert f.layout("x") == [("uss", (2, 2, 3), "float32", "none"), ("wss/C4", (2, 2, 3), "float32", "none"),
                                 ("wss/C5", (2, 2, 3), "float32", "none")]
        assert f.layout("absent") == []


def test_a_missing_group_or_a_dataset_in_its_place(tmp_path):
    path = write(tmp_path / "c.h5", CAMS_ATTRS, {"x": np.zeros(3)})
    with CamsFile.open(path) as c:
        refused(lambda: c.read_cam("x"), path, "/x should be a group, found a dataset")
        with pytest.raises(InputError) as caught:
            c.read_cam("y")
        assert (caught.value.image_id, caught.value.source, caught.value.problem) == ("y", path, "no group /y in this file")


@pytest.mark.parametrize("marker", [np.int8(1), "extend:uss"])  # what add and extend leave
def test_a_group_its_writer_did_not_finish_is_refused_for_every_dataset(tmp_path, marker):
    with cams(tmp_path) as c:
        path = str(c.path)
    with h5py.File(path, "a") as handle:
        handle["x"].attrs[INCOMPLETE_ATTR] = marker
    with CamsFile.open(path) as c:
        for read in (c.read_cam, c.read_base, c.read_image):
            refused(lambda: read("x"), path, "group /x is incomplete (its writer was interrupted)")


# ----------------------------------------------------------------------------------------------
# CAMs and tags
# ----------------------------------------------------------------------------------------------
def test_cam_and_tags_read_as_stored(tmp_path):
    notes = []
    with cams(tmp_path, cam=CAM.astype(np.float16), labels=np.array([1, 3], np.uint8)) as c:
        cam, labels = c.read_cam("x", notes)
    assert cam.dtype == np.float32 and labels.dtype == np.int64
    np.testing.assert_array_equal(cam, CAM)  # quarters: exact in float16
    assert labels.tolist() == [1, 3] and notes == []


def test_float64_cams_are_read_as_float32_and_noted(tmp_path):
    notes = []
    with cams(tmp_path, cam=CAM.astype(np.float64)) as c:
        cam, _ = c.read_cam("x", notes)
        assert cam.dtype == np.float32 and notes == ["cam: float64 read as float32"]
        c.read_cam("x")  # without a list of notes: nothing to note into


CAM_FAULTS = {
    "no cam": ({"cam": None}, "cam", "required dataset is missing"),
    "no labels": ({"labels": None}, "labels", "required dataset is missing"),
    "cam of rank 2": ({"cam": CAM[0]}, "cam", "expected shape [K, h, w] with K, h, w >= 1, found [2, 3]"),
    "cam with no channel": ({"cam": np.zeros((0, 2, 3), np.float32)}, "cam", "found [0, 2, 3]"),
    "cam a group": ({"cam": {"a": CAM}}, "cam", "expected shape [K, h, w] with K, h, w >= 1, found a group"),
    "integer cam": ({"cam": CAM.astype(np.int32)}, "cam", "expected float16/float32, found int32"),
    "NaN in cam": ({"cam": np.where(CAM == 0, np.nan, CAM)}, "cam", "expected finite values, found 1 NaN/Inf"),
    "Inf in cam": ({"cam": np.full((2, 2, 3), np.inf, np.float32)}, "cam", "expected finite values, found 12 NaN/Inf"),
    "labels of rank 2": ({"labels": np.array([[1, 3]])}, "labels", "expected shape [K], found [1, 2]"),
    "float labels": ({"labels": np.array([1.0, 3.0])}, "labels", "expected an integer dtype, found float64"),
    "fewer tags than channels": ({"labels": np.array([1])}, "labels", "expected 2 tags (one per cam channel), found 1"),
    "a tag past the classes": ({"labels": np.array([1, 4])}, "labels", "expected class ids in [0, 4), found [1, 4]"),
    "a negative tag": ({"labels": np.array([-1, 3])}, "labels", "expected class ids in [0, 4), found [-1, 3]"),
    "tags unsorted": ({"labels": np.array([3, 1])}, "labels", "expected unique ascending tags, found [3, 1]"),
    "tags repeated": ({"labels": np.array([3, 3])}, "labels", "expected unique ascending tags, found [3, 3]"),
    "the background tagged": ({"labels": np.array([0, 3])}, "labels",
                              "tags must not include the background id 0, found [0, 3]"),
}


@pytest.mark.parametrize("datasets, name, expected", CAM_FAULTS.values(), ids=CAM_FAULTS.keys())
def test_bad_cams_and_tags_name_image_dataset_and_expectation(datasets, name, expected, tmp_path):
    with cams(tmp_path, **datasets) as c:
        refused(lambda: c.read_cam("x"), f"{c.path}:/x/{name}", expected)


def test_a_corrupt_chunk_is_an_error_of_that_dataset(tmp_path):
    path = tmp_path / "c.h5"
    with h5py.File(path, "w") as handle:
        handle.attrs.update(CAMS_ATTRS)
        cam = handle.create_dataset("x/cam", data=np.ones((2, 32, 32), np.float32), chunks=(2, 32, 32), compression="gzip")
        handle.create_dataset("x/labels", data=np.array([1, 3]))
        chunk = cam.id.get_chunk_info(0)
    with open(path, "r+b") as raw:
        raw.seek(chunk.byte_offset)
        raw.write(b"\xff" * chunk.size)
    with CamsFile.open(path) as c:
        refused(lambda: c.read_cam("x"), f"{path}:/x/cam", "dataset cannot be read (truncated or corrupt)")


# ----------------------------------------------------------------------------------------------
# Base masks and images
# ----------------------------------------------------------------------------------------------
def test_base_and_image_read_as_stored_or_none_when_absent(tmp_path):
    with cams(tmp_path, base=BASE.astype(np.int64)) as c:
        base = c.read_base("x")
        assert base.dtype == np.uint8 and base.tolist() == BASE.tolist()
        np.testing.assert_array_equal(c.read_image("x"), IMAGE)
    with cams(tmp_path, name="bare.h5", base=None, image=None) as c:
        assert c.read_base("x") is None and c.read_image("x") is None


def test_a_base_mask_may_use_the_files_own_ignore_index(tmp_path):
    tags = {"cam": CAM, "labels": np.array([1, 3])}
    path = write(tmp_path / "c.h5", {**CAMS_ATTRS, "ignore_index": 9},
                 {"x": {**tags, "base": np.array([[0, 9, 3]], np.uint8)}, "y": {**tags, "base": np.array([[255]], np.uint8)}})
    with CamsFile.open(path) as c:
        assert c.read_base("x").tolist() == [[0, 9, 3]]  # kept as stored: the caller maps it to 255
        refused(lambda: c.read_base("y"), f"{path}:/y/base", "expected class ids in [0, 4) or 9, found [255]", image_id="y")


IMAGE_FAULTS = {
    "base of rank 3": ({"base": BASE[None]}, "base", "expected shape [H, W], found [1, 4, 6]"),
    "float base": ({"base": BASE.astype(np.float32)}, "base", "expected uint8 class ids, found float32"),
    "base id past the classes": ({"base": np.where(BASE == 3, 40, BASE)}, "base",
                                 "expected class ids in [0, 4) or 255, found [40]"),
    "negative base id": ({"base": np.where(BASE == 3, -1, BASE.astype(np.int16))}, "base",
                         "expected class ids in [0, 4) or 255, found [-1]"),
    "image of rank 4": ({"image": IMAGE[None]}, "image", "expected shape [H, W, 3] (RGB), found [1, 4, 6, 3]"),
    "image of 5 channels": ({"image": np.zeros((4, 6, 5), np.uint8)}, "image", "expected shape [H, W, 3] (RGB), found [4, 6, 5]"),
    "float image": ({"image": IMAGE.astype(np.float32)}, "image", "expected uint8 (or uint16) values, found float32"),
    "int32 image": ({"image": IMAGE.astype(np.int32)}, "image", "expected uint8 (or uint16) values, found int32"),
}


@pytest.mark.parametrize("datasets, name, expected", IMAGE_FAULTS.values(), ids=IMAGE_FAULTS.keys())
def test_bad_base_masks_and_images_name_image_dataset_and_expectation(datasets, name, expected, tmp_path):
    with cams(tmp_path, **datasets) as c:
        read = c.read_base if name == "base" else c.read_image
        refused(lambda: read("x"), f"{c.path}:/x/{name}", expected)


ADAPTED = {  # stored image -> (what is read, the note)
    "grey [H, W]": (IMAGE[:, :, 1], np.repeat(IMAGE[:, :, 1:2], 3, axis=2), "image: grey copied to R, G, B"),
    "grey [H, W, 1]": (IMAGE[:, :, 1:2], np.repeat(IMAGE[:, :, 1:2], 3, axis=2), "image: grey copied to R, G, B"),
    "grey and alpha": (IMAGE[:, :, :2], np.repeat(IMAGE[:, :, :1], 3, axis=2),
                       "image: grey copied to R, G, B (alpha dropped)"),
    "RGBA": (np.concatenate([IMAGE, np.full((4, 6, 1), 7, np.uint8)], axis=2), IMAGE, "image: RGBA: alpha dropped"),
    "16-bit": (IMAGE.astype(np.uint16) * 257, IMAGE, "image: 16-bit values scaled to 8 bits"),
}


@pytest.mark.parametrize("stored, expected, note", ADAPTED.values(), ids=ADAPTED.keys())
def test_images_that_can_be_converted_are_and_noted(stored, expected, note, tmp_path):
    notes = []
    with cams(tmp_path, image=stored) as c:
        image = c.read_image("x", notes)
    assert image.dtype == np.uint8 and image.shape == (4, 6, 3)
    np.testing.assert_array_equal(image, expected)
    assert notes == [note]


def test_sixteen_bit_values_round_to_the_nearest_eighth_bit_step():
    # x / 257 rounded: 128 / 257 = 0.498 -> 0, 129 -> 0.502 -> 1, 385 -> 1.498 -> 1, 386 -> 2
    values = np.array([[0, 128, 129, 257, 385, 386, 65535]], np.uint16)
    notes = []
    got = as_rgb_uint8(values, "x", "src", notes)
    assert got[0, :, 0].tolist() == [0, 0, 1, 1, 1, 2, 255] and (got[..., 0] == got[..., 2]).all()
    assert notes == ["image: 16-bit values scaled to 8 bits, grey copied to R, G, B"]


def test_converted_images_are_writable_and_contiguous():
    frozen = np.ascontiguousarray(IMAGE[:, ::-1])  # e.g. np.asarray of a PIL image: read-only
    frozen.setflags(write=False)
    got = as_rgb_uint8(frozen, "x", "src", None, name="image a.png")
    assert got.flags.writeable and got.flags.c_contiguous
    np.testing.assert_array_equal(got, IMAGE[:, ::-1])
    with pytest.raises(InputError, match="expected shape \\[H, W, 3\\] \\(RGB\\), found \\[0, 6, 3\\]"):
        as_rgb_uint8(IMAGE[:0], "x", "src", None)


# ----------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------
def test_uss_and_wss_layers_read_sorted_by_name(tmp_path):
    with feats(tmp_path) as f:
        np.testing.assert_array_equal(f.read_uss("x"), USS)
        layers = f.read_wss("x")
    assert [name for name, _ in layers] == ["C4", "C5"]  # written C5 first
    np.testing.assert_array_equal(layers[0][1], USS)
    np.testing.assert_array_equal(layers[1][1], USS * 2)


def test_one_wss_dataset_is_one_layer_named_wss(tmp_path):
    with feats(tmp_path, wss=USS.astype(np.float16)) as f:
        [(name, layer)] = f.read_wss("x")
    assert name == "wss" and layer.dtype == np.float32
    np.testing.assert_array_equal(layer, USS)


def test_feature_cells_holding_nan_are_zeroed_and_noted(tmp_path):
    uss = USS.copy()
    uss[1, 0, 2] = np.nan  # one channel of one cell: the whole cell goes
    uss[0, 1, 1] = -np.inf
    notes = []
    with feats(tmp_path, uss=uss, wss={"C4": USS.astype(np.float64)}) as f:
        got = f.read_uss("x", notes)
        f.read_wss("x", notes)
    expected = USS.copy()
    expected[:, 0, 2] = 0
    expected[:, 1, 1] = 0
    np.testing.assert_array_equal(got, expected)
    assert notes == ["uss: 2 of 6 cells held NaN/Inf and were zeroed", "wss/C4: float64 read as float32"]


FEATURE_FAULTS = {
    "no uss": ({"uss": None}, "uss", "required dataset is missing"),
    "no wss": ({"wss": None}, "wss", "required dataset is missing"),
    "uss a group": ({"uss": {"a": USS}}, "uss", "expected a dataset, found a group"),
    "uss of rank 2": ({"uss": USS[0]}, "uss", "expected shape [D, h, w], found [2, 3]"),
    "uss with no channel": ({"uss": np.zeros((0, 2, 3), np.float32)}, "uss", "expected non-empty [D, h, w], found [0, 2, 3]"),
    "integer uss": ({"uss": USS.astype(np.int32)}, "uss", "expected a float dtype, found int32"),
    "uss all NaN": ({"uss": np.full((2, 2, 3), np.nan, np.float32)}, "uss", "every feature cell holds NaN or Inf"),
    "uss all zero": ({"uss": np.zeros((2, 2, 3), np.float32)}, "uss",
                     "every feature vector is zero: the map carries no information"),
    "wss an empty group": ({"wss": {}}, "wss", "expected one or more layers, found an empty group"),
    "a bad wss layer": ({"wss": {"C4": USS, "C5": USS[0]}}, "wss/C5", "expected shape [D, h, w], found [2, 3]"),
    "one wss dataset of rank 2": ({"wss": USS[0]}, "wss", "expected shape [D, h, w], found [2, 3]"),
}


@pytest.mark.parametrize("datasets, name, expected", FEATURE_FAULTS.values(), ids=FEATURE_FAULTS.keys())
def test_bad_features_name_image_dataset_and_expectation(datasets, name, expected, tmp_path):
    with feats(tmp_path, **datasets) as f:
        read = f.read_uss if name == "uss" else f.read_wss
        refused(lambda: read("x"), f"{f.path}:/x/{name}", expected)
