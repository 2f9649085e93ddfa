"""``--shard I/N``: a coordination-free partition of the ids, and shards that merge."""
import json

import numpy as np
import pytest
from helpers_bench import make_inputs  # noqa: E402
from PIL import Image
from typer.testing import CliRunner

from dhr_label.cli import app
from dhr_label.runtime.selection import Shard, select_ids

runner = CliRunner()
# The published CRC-32 check value: crc32(b"123456789") = 0xCBF43926 = 3421780262.
CHECK_ID, CHECK_CRC = "123456789", 3_421_780_262


@pytest.mark.parametrize("text, expected", [("1/1", Shard(1, 1)), ("3/8", Shard(3, 8)), ("8/8", Shard(8, 8))])
def test_parse_valid(text, expected):
    assert Shard.parse(text) == expected


@pytest.mark.parametrize("text", ["0/4", "5/4", "1", "a/b", "1/2/3", "-1/2", ""])
def test_parse_invalid(text):
    with pytest.raises(ValueError, match="shard"):
        Shard.parse(text)


@pytest.mark.parametrize("count, owner", [(2, 1), (3, 3), (7, 6), (8, 7)])
def test_owner_is_crc32_modulo_count(count, owner):
    # 3421780262 mod 2 = 0, mod 3 = 2 (digit sum 35), mod 7 = 5, mod 8 = 6 (262 mod 8).
    assert CHECK_CRC % count == owner - 1
    owners = [i for i in range(1, count + 1) if Shard(i, count).owns(CHECK_ID)]
    assert owners == [owner]


@pytest.mark.parametrize("count", [1, 2, 3, 7, 64])
def test_shards_partition_the_ids(count):
    ids = [f"{year}_{n:06d}" for year in (2007, 2008) for n in range(400)]
    parts = [select_ids(ids, shard=Shard(i, count))[0] for i in range(1, count + 1)]
    seen = [i for part in parts for i in part]
    assert len(seen) == len(set(seen))  # disjoint
    assert set(seen) == set(ids)  # covering
    if count > 1:  # and balanced: no shard is empty or holds more than twice its share
        assert all(0 < len(part) < 2 * len(ids) / count for part in parts)


def test_shard_ignores_the_subset_it_is_given():
    ids = [f"img{n:04d}" for n in range(100)]
    whole = set(select_ids(ids, shard=Shard(2, 3))[0])
    subset = set(select_ids(ids, wanted=ids[::2], shard=Shard(2, 3))[0])
    assert subset == whole & set(ids[::2])


def test_limit_applies_after_the_shard():
    ids = [f"img{n:04d}" for n in range(50)]
    owned = select_ids(ids, shard=Shard(1, 2))[0]
    assert select_ids(ids, shard=Shard(1, 2), limit=3)[0] == owned[:3]


def test_shards_write_disjoint_masks_that_merge(tmp_path):
    data = tmp_path / "data"
    ids = make_inputs().generate(data, 6, scale="tiny", seed=3)
    out = tmp_path / "out"
    common = ["refine", "--cams", str(data / "cams.h5"), "--feats", str(data / "feats.h5"), "--out", str(out), "--workers", "1", "--json"]
    owned = {}
    for index in (1, 2):
        result = runner.invoke(app, [*common, "--shard", f"{index}/2"])
        assert result.exit_code == 0, result.stderr
        summary = json.loads(result.stdout)
        owned[index] = {i for i in ids if Shard(index, 2).owns(i)}
        assert summary["counts"]["done"] == len(owned[index])
        manifest = json.loads((out / f"dhr-label-manifest.shard-{index}-of-2.json").read_text())
        assert manifest["shard"] == {"index": index, "count": 2}
    assert owned[1].isdisjoint(owned[2]) and owned[1] | owned[2] == set(ids)
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(ids)

    # The same masks as one unsharded run: the shard changes who computes, not what.
    whole = tmp_path / "whole"
    result = runner.invoke(app, ["refine", *common[1:5], "--out", str(whole), "--workers", "1"])
    assert result.exit_code == 0, result.stderr
    for image_id in ids:
        assert np.array_equal(np.asarray(Image.open(out / f"{image_id}.png")), np.asarray(Image.open(whole / f"{image_id}.png")))

    result = runner.invoke(app, ["merge-manifests", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    merged = json.loads((out / "dhr-label-manifest.json").read_text())
    assert merged["counts"]["done"] == 6 and merged["counts"]["failed"] == 0
    assert [s["index"] for s in merged["shards"]] == [1, 2] and merged["complete"] is True
