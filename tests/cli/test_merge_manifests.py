"""``dhr-label merge-manifests``: shard manifests in, one manifest out, exit 1 unless complete."""
import json

import pytest
from typer.testing import CliRunner

from dhr_label.cli import app
from dhr_label.io.manifest import MANIFEST_FORMAT, write_manifest

runner = CliRunner()
PARAMS = {"ot": {"eps": 0.1}, "gamma": 1.0}


def shard_manifest(index, count, *, done, failed=(), skipped=0, not_run=0, interrupted=False, params=PARAMS, host="node"):
    """A shard's manifest (version 2) whose latest run is described by the arguments."""
    failures = [{"id": image_id, "reason": "bad cam"} for image_id in failed]
    fingerprint = {"parameters": params, "inputs": {"cams": {"name": "cams.h5", "bytes": 100}}}
    run = {
        "tool": "dhr-label", "host": f"{host}{index}", "pid": 100 + index, "seconds": 10.0 * index,
        "status": "interrupted" if interrupted else "complete", "interrupted": interrupted, "error": None,
        "inputs": {"cams": {"path": "/data/cams.h5"}, "feats": {"path": "/data/feats.h5"}},
        "counts": {
            "selected": done + len(failures) + skipped + not_run, "done": done, "skipped": skipped,
            "failed": len(failures), "not_run": not_run,
        },
        "failures": failures,
        "notes": {f"img{index}": ["no base mask"]},
    }
    return {
        "format": MANIFEST_FORMAT, "manifest_version": 2, "command": "refine",
        "fingerprint_id": json.dumps(params, sort_keys=True), "fingerprint": fingerprint,
        "preset": {"name": "voc", "classes": ["background", "cat"], "background": 0},
        "parameters": params, "shard": {"index": index, "count": count},
        "runs": [{**run, "status": "interrupted", "counts": {"done": 0}}, run],  # an earlier try, then the latest
    }


def write_shards(directory, *manifests):
    for manifest in manifests:
        shard = manifest["shard"]
        write_manifest(directory / f"dhr-label-manifest.shard-{shard['index']}-of-{shard['count']}.json", manifest)


def merge(directory, *extra):
    return runner.invoke(app, ["merge-manifests", str(directory), *extra])


def merged_file(directory):
    return json.loads((directory / "dhr-label-manifest.json").read_text())


def test_complete_shards_merge_with_summed_counts(tmp_path):
    write_shards(tmp_path, shard_manifest(1, 3, done=4), shard_manifest(2, 3, done=5, skipped=2), shard_manifest(3, 3, done=1))
    result = merge(tmp_path, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["complete"] is True and summary["shards"] == 3 and summary["of"] == 3
    # 4 + 5 + 1 done, 2 skipped, 12 selected.
    assert summary["counts"] == {"selected": 12, "done": 10, "skipped": 2, "failed": 0, "not_run": 0}
    assert result.stderr == ""
    merged = merged_file(tmp_path)
    assert merged["counts"]["done"] == 10 and merged["complete"] is True
    assert [run["host"] for run in merged["shard_runs"]] == ["node1", "node2", "node3"]
    assert [run["seconds"] for run in merged["shard_runs"]] == [10.0, 20.0, 30.0]
    assert "host" not in merged and "seconds" not in merged  # per-run fields live per shard
    assert sorted(merged["notes"]) == ["img1", "img2", "img3"]


def test_the_summary_goes_to_stderr_as_every_commands_does(tmp_path):
    write_shards(tmp_path, shard_manifest(1, 2, done=3), shard_manifest(2, 2, done=3))
    result = merge(tmp_path)
    assert result.exit_code == 0
    assert "2 of 2" in result.stderr and "6" in result.stderr
    assert result.stdout == ""  # stdout holds results: the JSON document with --json


def test_missing_shard_is_named_and_fails(tmp_path):
    write_shards(tmp_path, shard_manifest(1, 4, done=2), shard_manifest(3, 4, done=2))
    result = merge(tmp_path, "--json")
    assert result.exit_code == 1
    assert "2 of 4 shard manifest(s) missing: shard(s) 2, 4" in result.stderr
    assert json.loads(result.stdout)["complete"] is False
    merged = merged_file(tmp_path)  # still written: it says what is missing
    assert merged["complete"] is False and merged["counts"]["done"] == 4


def test_failed_images_fail_the_merge(tmp_path):
    write_shards(tmp_path, shard_manifest(1, 2, done=3, failed=["b", "a"]), shard_manifest(2, 2, done=3, failed=["c"]))
    result = merge(tmp_path)
    assert result.exit_code == 1
    assert "3 image(s) failed" in result.stderr
    assert [f["id"] for f in merged_file(tmp_path)["failures"]] == ["a", "b", "c"]


def test_interrupted_shard_fails_the_merge(tmp_path):
    write_shards(tmp_path, shard_manifest(1, 2, done=3), shard_manifest(2, 2, done=1, not_run=4, interrupted=True))
    result = merge(tmp_path)
    assert result.exit_code == 1
    assert "shard 2/2 was interrupted (4 image(s) not run)" in result.stderr


def test_shards_of_different_runs_are_refused(tmp_path):
    write_shards(tmp_path, shard_manifest(1, 2, done=3), shard_manifest(2, 2, done=3, params={"ot": {"eps": 0.05}, "gamma": 1.0}))
    result = merge(tmp_path)
    assert result.exit_code == 1
    assert "disagree on 'fingerprint_id'" in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "dhr-label-manifest.json").exists()


def test_shards_of_different_splits_fail(tmp_path):
    write_shards(tmp_path, shard_manifest(1, 2, done=3), shard_manifest(1, 3, done=3))
    result = merge(tmp_path)
    assert result.exit_code == 1
    assert "different splits" in result.stderr


def test_no_shard_manifest_is_an_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    result = merge(tmp_path)
    assert result.exit_code == 1
    assert "nothing to merge" in result.stderr and result.stdout == ""


def test_a_file_named_for_another_shard_is_refused(tmp_path):
    write_manifest(tmp_path / "dhr-label-manifest.shard-2-of-2.json", shard_manifest(1, 2, done=3))
    result = merge(tmp_path)
    assert result.exit_code == 1
    assert "dhr-label-manifest.shard-2-of-2.json" in result.stderr and "content says" in result.stderr


def test_a_broken_manifest_is_named(tmp_path):
    write_shards(tmp_path, shard_manifest(1, 2, done=3))
    (tmp_path / "dhr-label-manifest.shard-2-of-2.json").write_text("{not json")
    result = merge(tmp_path)
    assert result.exit_code == 1
    assert "shard-2-of-2.json: cannot read this manifest" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unsharded_manifest_is_not_overwritten(tmp_path):
    write_shards(tmp_path, shard_manifest(1, 2, done=3), shard_manifest(2, 2, done=3))
    single = shard_manifest(1, 1, done=6)
    write_manifest(tmp_path / "dhr-label-manifest.json", single)
    result = merge(tmp_path)
    assert result.exit_code == 1
    assert "is not a merged manifest" in result.stderr
    assert merged_file(tmp_path) == single


def test_merging_again_replaces_the_merged_manifest(tmp_path):
    write_shards(tmp_path, shard_manifest(1, 2, done=3))
    assert merge(tmp_path).exit_code == 1
    write_shards(tmp_path, shard_manifest(2, 2, done=4))
    result = merge(tmp_path)
    assert result.exit_code == 0, result.stderr
    assert merged_file(tmp_path)["counts"]["done"] == 7


@pytest.mark.parametrize("args", [[], ["/no/such/dir"]])
def test_usage_errors(args):
    result = merge(*args) if args else runner.invoke(app, ["merge-manifests"])
    assert result.exit_code == 2
