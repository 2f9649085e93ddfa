"""dhr_label.Writer: the contract written from arrays, read back through the contract reader."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

import dhr_label
from dhr_label.errors import FileLevelError, InputError
from dhr_label.io.checks import chunk_shape
from dhr_label.io.contract import INCOMPLETE_ATTR, CamsFile, FeatsFile
from dhr_label.io.writer import Writer
from dhr_label.presets import PRESETS

VOC = list(PRESETS["voc"].classes)


def eighths(shape, seed=0):
    """Values k/8 in [-4, 4): exact in float16, so a float16 round trip is exact."""
    rng = np.random.default_rng(seed)
    return (rng.integers(-32, 32, size=shape) / 8).astype(np.float32)


def test_writer_is_exported():
    assert dhr_label.Writer is Writer
    assert "Writer" in dhr_label.__all__


def test_cams_round_trip_known_answer(tmp_path):
    cam = eighths((2, 3, 4))
    base = np.array([[0, 1, 255, 15], [15, 15, 0, 0]], dtype=np.uint8)
    image = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 4, 3)
    with Writer(tmp_path / "cams.h5", classes="voc") as w:
        # tags given out of order: channels must follow them to ascending order
        assert w.add("2007_000032", cam=cam, labels=[15, 1], base=base, image=image) is True
    with CamsFile.open(tmp_path / "cams.h5") as f:
        assert (f.classes, f.background, f.ignore_index, f.version) == (VOC, 0, 255, 1)
        assert f.ids() == ["2007_000032"]
        got_cam, got_labels = f.read_cam("2007_000032")
        assert got_labels.tolist() == [1, 15]
        np.testing.assert_array_equal(got_cam, cam[[1, 0]])  # exact: k/8 fits float16
        np.testing.assert_array_equal(f.read_base("2007_000032"), base)
        np.testing.assert_array_equal(f.read_image("2007_000032"), image)
    with h5py.File(tmp_path / "cams.h5", "r") as h:
        assert h.attrs["format"] == "dhr-label/cams"
        assert json.loads(h.attrs["classes"]) == VOC
        assert int(h.attrs["background"]) == 0
        assert h["2007_000032/cam"].dtype == np.float16
        assert INCOMPLETE_ATTR not in h["2007_000032"].attrs


def test_no_background_dataset_writes_minus_one(tmp_path):
    names = ["sky", "road", "car"]
    with Writer(tmp_path / "c.h5", classes=names) as w:
        w.add("a", cam=np.ones((1, 2, 2)), labels=[0])
    with CamsFile.open(tmp_path / "c.h5") as f:
        assert (f.classes, f.background) == (names, None)
        assert f.read_cam("a")[1].tolist() == [0]
    with h5py.File(tmp_path / "c.h5", "r") as h:
        assert int(h.attrs["background"]) == -1


def test_float16_default_and_float32_kept(tmp_path):
    tenth = np.full((1, 2, 2), 0.1, dtype=np.float32)  # 0.1 is not exact in float16
    for dtype, expected in (("float16", np.float16(0.1)), ("float32", np.float32(0.1))):
        path = tmp_path / f"{dtype}.h5"
        with Writer(path, kind="feats", dtype=dtype) as w:
            w.add("a", uss=tenth)
        with h5py.File(path, "r") as h:
            assert h["a/uss"].dtype == np.dtype(dtype)
        with FeatsFile.open(path) as f:
            assert f.read_uss("a")[0, 0, 0] == np.float32(expected)
    assert np.float32(np.float16(0.1)) != np.float32(0.1)


def test_storage_is_chunked_and_compressed(tmp_path):
    with Writer(tmp_path / "f.h5", kind="feats") as w:
        w.add("a", uss=np.ones((4, 8, 8)), wss={"C4": np.ones((2, 4, 4)), "C5": np.ones((3, 4, 4))})
    with h5py.File(tmp_path / "f.h5", "r") as h:
        for name in ("a/uss", "a/wss/C4", "a/wss/C5"):
            assert h[name].chunks == h[name].shape  # small maps: one chunk each
            assert h[name].compression == "gzip"


@pytest.mark.parametrize(
    ("shape", "itemsize", "expected"),
    [
        ((3, 375, 500), 2, (2, 375, 500)),  # 3 channels = 1.07 MiB > 1 MiB: 2 channels a chunk
        ((3000, 4000, 3), 1, (87, 4000, 3)),  # floor(2**20 / 12000) = 87 rows
        ((1, 10, 10), 4, (1, 10, 10)),
        ((1, 1024, 1024), 4, (1, 256, 1024)),  # one channel is 4 MiB: 256 rows of 4 KiB
    ],
)
def test_chunk_shape(shape, itemsize, expected):
    assert chunk_shape(shape, itemsize) == expected


def test_float16_overflow_is_refused_and_nothing_written(tmp_path):
    with Writer(tmp_path / "c.h5", classes="voc") as w:
        with pytest.raises(InputError) as info:
            w.add("x", cam=np.full((1, 2, 2), 1e5), labels=[3])
        assert "x" not in w
    assert info.value.image_id == "x"
    assert info.value.source.endswith("c.h5:/x/cam")
    assert "overflow float16" in info.value.problem and "float32" in info.value.problem
    with Writer(tmp_path / "c32.h5", classes="voc", dtype="float32") as w:
        assert w.add("x", cam=np.full((1, 2, 2), 1e5), labels=[3]) is True


@pytest.mark.parametrize(
    ("arrays", "dataset", "message"),
    [
        ({"labels": [0, 3]}, "labels", "must not include the background id 0"),
        ({"labels": [3, 21]}, "labels", "expected class ids in [0, 21), found [3, 21]"),
        ({"labels": [3, 3]}, "labels", "expected unique class ids"),
        ({"labels": [3]}, "cam", "expected 1 channels (one per tag), found 2"),
        ({"cam": np.full((2, 2, 2), np.nan)}, "cam", "expected finite values, found 8 NaN/Inf"),
        ({"cam": np.ones((2, 2))}, "cam", "expected shape [K, h, w]"),
        ({"base": np.full((2, 2), 30)}, "base", "expected class ids in [0, 21) or 255, found [30]"),
        ({"image": np.zeros((2, 2), np.uint8)}, "image", "expected shape [H, W, 3], found [2, 2]"),
        ({"image": np.zeros((2, 2, 3))}, "image", "expected uint8 RGB values"),
        ({"base": np.zeros((2, 3), np.uint8), "image": np.zeros((2, 2, 3), np.uint8)}, "base", "H x W [2, 2]"),
    ],
)
def test_bad_arrays_name_image_dataset_and_expectation(tmp_path, arrays, dataset, message):
    good = {"cam": np.ones((2, 2, 2)), "labels": [3, 5]}
    with Writer(tmp_path / "c.h5", classes="voc") as w:
        with pytest.raises(InputError) as info:
            w.add("img-1", **{**good, **arrays})
        assert "img-1" not in w
    assert info.value.image_id == "img-1"
    assert info.value.source == f"{tmp_path / 'c.h5'}:/img-1/{dataset}"
    assert message in info.value.problem


@pytest.mark.parametrize("bad_id", ["a b", "a/b", "..", ""])
def test_bad_image_ids(tmp_path, bad_id):
    with Writer(tmp_path / "c.h5", classes="voc") as w:
        with pytest.raises(InputError, match="image id may hold only"):
            w.add(bad_id, cam=np.ones((1, 2, 2)), labels=[1])


def test_append_skips_complete_ids_and_keeps_their_data(tmp_path):
    path = tmp_path / "c.h5"
    with Writer(path, classes="voc") as w:
        w.add("a", cam=np.full((1, 2, 2), 0.5), labels=[1])
    with Writer(path) as w:  # classes come from the file when appending
        assert w.classes == VOC and w.background == 0
        assert "a" in w and "b" not in w
        assert w.add("a", cam=np.full((1, 2, 2), 0.25), labels=[2]) is False
        assert w.add("b", cam=np.full((1, 2, 2), 0.25), labels=[2]) is True
    with CamsFile.open(path) as f:
        assert f.ids() == ["a", "b"]
        cam, labels = f.read_cam("a")
        assert labels.tolist() == [1] and cam.max() == 0.5


def test_append_refuses_a_different_file(tmp_path):
    path = tmp_path / "c.h5"
    with Writer(path, classes="voc") as w:
        w.add("a", cam=np.ones((1, 2, 2)), labels=[1])
    with pytest.raises(FileLevelError, match="the file's classes is"):
        Writer(path, classes="camvid")
    with pytest.raises(FileLevelError, match="'format' is 'dhr-label/cams', expected 'dhr-label/feats'"):
        Writer(path, kind="feats")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(FileLevelError, match="cannot open to append"):
        Writer(tmp_path / "junk.h5", classes="voc")


def test_mode_w_starts_a_new_file(tmp_path):
    path = tmp_path / "c.h5"
    with Writer(path, classes="voc") as w:
        w.add("a", cam=np.ones((1, 2, 2)), labels=[1])
    with Writer(path, classes="camvid", mode="w") as w:
        assert "a" not in w
    with CamsFile.open(path) as f:
        assert f.ids() == [] and len(f.classes) == 11


def test_argument_errors():
    with pytest.raises(ValueError, match="classes= is required"):
        Writer("/nonexistent-dir-for-test/c.h5")
    with pytest.raises(ValueError, match="belong to a cams file"):
        Writer("f.h5", kind="feats", classes="voc")
    with pytest.raises(ValueError, match="dtype must be one of"):
        Writer("f.h5", kind="feats", dtype="float64")


def test_kind_decides_the_arrays(tmp_path):
    with Writer(tmp_path / "c.h5", classes="voc") as w:
        with pytest.raises(TypeError, match="takes cam= and labels="):
            w.add("a", uss=np.ones((1, 2, 2)))
    with Writer(tmp_path / "f.h5", kind="feats") as w:
        with pytest.raises(TypeError, match="takes uss= and/or wss="):
            w.add("a", cam=np.ones((1, 2, 2)), labels=[1])


def test_feature_layers_and_combined_file(tmp_path):
    uss, c4, c5 = eighths((3, 4, 4), 1), eighths((2, 2, 2), 2), eighths((5, 2, 2), 3)
    path = tmp_path / "both.h5"
    with Writer(path, classes="voc", kind="combined") as w:
        w.add("a", cam=eighths((1, 2, 2)), labels=[7], uss=uss, wss={"C5": c5, "C4": c4})
    with CamsFile.open(path, combined=True) as f:
        assert f.read_cam("a")[1].tolist() == [7]
    with FeatsFile.open(path, combined=True) as f:
        np.testing.assert_array_equal(f.read_uss("a"), uss)
        layers = f.read_wss("a")
        assert [name for name, _ in layers] == ["C4", "C5"]
        np.testing.assert_array_equal(layers[0][1], c4)
        np.testing.assert_array_equal(layers[1][1], c5)


def test_torch_tensors_are_accepted(tmp_path):
    torch = pytest.importorskip("torch")
    with Writer(tmp_path / "f.h5", kind="feats") as w:
        w.add("a", uss=torch.full((2, 2, 2), 0.375, dtype=torch.bfloat16), wss=torch.ones(1, 2, 2, dtype=torch.float16))
    with FeatsFile.open(tmp_path / "f.h5") as f:
        assert f.read_uss("a").tolist() == np.full((2, 2, 2), 0.375).tolist()
        assert f.read_wss("a")[0][1].sum() == 4.0


KILL_WHILE_WRITING = textwrap.dedent(
    """
    import os, sys
    import h5py, numpy as np
    from dhr_label.io.writer import Writer

    w = Writer(sys.argv[1], kind="feats")
    w.add("done", uss=np.full((2, 3, 4), 0.25))
    # Die after the datasets of "killed" are flushed, when the writer would declare it complete.
    h5py.AttributeManager.__delitem__ = lambda self, name: os._exit(3)
    w.add("killed", uss=np.ones((2, 3, 4)), wss=np.ones((5, 3, 4)))
    """
)


def test_a_killed_writer_never_leaves_a_complete_looking_group(tmp_path):
    path = tmp_path / "f.h5"
    run = subprocess.run([sys.executable, "-c", KILL_WHILE_WRITING, str(path)], capture_output=True, text=True)
    assert run.returncode == 3, run.stderr
    with h5py.File(path, "r") as h:
        assert sorted(h) == ["done", "killed"]
        assert sorted(h["killed"]) == ["uss", "wss"]  # the data reached the file ...
        assert INCOMPLETE_ATTR in h["killed"].attrs  # ... but the group is marked unfinished
    with FeatsFile.open(path) as f:
        with pytest.raises(InputError, match="incomplete"):
            f.read_uss("killed")
    with Writer(path, kind="feats") as w:
        assert "done" in w and "killed" not in w
        assert w.add("done", uss=np.ones((2, 3, 4))) is False
        assert w.add("killed", uss=np.full((2, 3, 4), 2.0)) is True
    with FeatsFile.open(path) as f:
        assert f.read_uss("killed").sum() == 48.0
        assert f.read_uss("done").sum() == 6.0
