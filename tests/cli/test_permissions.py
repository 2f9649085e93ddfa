"""Permission faults, simulated so that they run as root too (root reads and writes anything,
so the real-permission test in test_faults.py can only run as a normal user)."""
import errno
import os

import h5py
from helpers_h5 import make_dataset, make_records, run_refine

from dhr_label.io import contract


def test_an_unreadable_cams_file_is_one_line(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "in", records=make_records(1))
    real = h5py.File

    def refuse(path, *args, **kwargs):
        if os.fspath(path) == os.fspath(data.cams):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(contract.h5py, "File", refuse)
    result = run_refine(data, tmp_path / "out")
    assert result.exit_code == 1
    assert "Permission denied" in result.stderr and str(data.cams) in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1


def test_an_unwritable_output_directory_is_refused_before_any_work(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "in", records=make_records(1))
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    def no_write(path, mode, **kwargs):
        if os.fspath(path) == os.fspath(locked) and mode & os.W_OK:
            return False
        return real(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", no_write)
    result = run_refine(data, locked)
    assert result.exit_code == 1, result.stderr
    assert result.stderr.strip() == f"error: the output directory {locked} is not writable"
    assert list(locked.iterdir()) == []
