"""Writer.extend (uss beside a group's WSS layers, atomically) and the feats file's USS record."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from dhr_label.errors import FileLevelError, InputError
from dhr_label.features.pca import PCAFit
from dhr_label.io.contract import INCOMPLETE_ATTR, FeatsFile
from dhr_label.io.uss_record import projection_from_file, read_projection, read_settings, write_record
from dhr_label.io.writer import Writer


def _wss_file(path):
    rng = np.random.default_rng(0)
    with Writer(path, kind="feats", dtype="float32") as w:
        w.add("a", wss={"C4": rng.normal(size=(3, 4, 5)), "C5": rng.normal(size=(2, 4, 5))})
    return path


def test_extend_keeps_the_wss_layers(tmp_path):
    path = _wss_file(tmp_path / "feats.h5")
    uss = np.random.default_rng(1).normal(size=(6, 8, 10)).astype(np.float32)
    with Writer(path, kind="feats", dtype="float32") as w:
        assert w.extend("a", uss=uss, attrs={"made_by": "x"})
        assert not w.extend("a", uss=uss)  # complete: nothing written
        assert w.extend("b", uss=uss)  # a new group
        assert w.uss_tags("made_by") == {"a": "x", "b": None}
    with FeatsFile.open(path) as f:
        assert np.array_equal(f.read_uss("a"), uss)
        assert [name for name, _ in f.read_wss("a")] == ["C4", "C5"]


def test_an_interrupted_extend_hides_the_group_until_the_next_one_completes_it(tmp_path):
    path = _wss_file(tmp_path / "feats.h5")
    with h5py.File(path, "r+") as handle:  # what a writer killed inside extend leaves behind
        handle["a"].attrs[INCOMPLETE_ATTR] = "extend:uss"
        handle["a"].create_dataset("uss", data=np.zeros((1, 2, 2), np.float32))
    with FeatsFile.open(path) as f, pytest.raises(InputError, match="incomplete"):
        f.read_wss("a")
    uss = np.ones((2, 4, 5), np.float32)
    with Writer(path, kind="feats", dtype="float32") as w:
        assert "a" not in w
        assert w.extend("a", uss=uss)
    with FeatsFile.open(path) as f:
        assert np.array_equal(f.read_uss("a"), uss) and len(f.read_wss("a")) == 2


def test_extend_validates_and_needs_the_cams_of_a_combined_file(tmp_path):
    path = _wss_file(tmp_path / "feats.h5")
    with Writer(path, kind="feats") as w, pytest.raises(InputError, match="uss"):
        w.extend("a", uss=np.full((2, 3, 3), np.nan, np.float32))
    with Writer(tmp_path / "cams.h5", classes="voc", kind="combined") as w:
        with pytest.raises(InputError, match="write its cam first"):
            w.extend("new", uss=np.ones((2, 3, 3), np.float32))


def test_record_round_trip_of_a_wide_projection(tmp_path):
    rng = np.random.default_rng(2)
    fit = PCAFit()
    fit.add(rng.normal(size=(300, 20, 20)))  # 64 x 300 float32 = 76.8 kB: more than one attribute block
    projection = fit.fit(64)
    path = _wss_file(tmp_path / "feats.h5")
    with Writer(path, kind="feats") as w:
        write_record(w.root_attrs(), {"backbone": "x"}, projection)
    with h5py.File(path, "r") as handle:
        assert read_settings(handle.attrs) == {"backbone": "x"}
        back = read_projection(handle.attrs, str(path))
    assert np.array_equal(back.components, projection.components) and back.cells == 400
    assert np.array_equal(projection_from_file(path).mean, projection.mean)
    with FeatsFile.open(path) as f:
        assert f.ids() == ["a"]  # the record is attributes only: no group a reader would take for an image


def test_damaged_or_missing_record(tmp_path):
    path = _wss_file(tmp_path / "feats.h5")
    with pytest.raises(FileLevelError, match="holds no USS PCA"):
        projection_from_file(path)
    fit = PCAFit()
    fit.add(np.random.default_rng(3).normal(size=(5, 4, 4)))
    with Writer(path, kind="feats") as w:
        write_record(w.root_attrs(), {}, fit.fit(2))
        w.root_attrs()["uss_pca_mean"] = np.zeros(5, np.float32)
    with pytest.raises(FileLevelError, match="damaged"):
        projection_from_file(path)
