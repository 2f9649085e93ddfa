"""An output directory that knows what is in it: fingerprints, history, one lock covering shards.

Each test names the defect it guards against (issue "Runs a user can trust", item 2 and 4).
"""
from __future__ import annotations

import json

import pytest
from helpers_h5 import last_run, make_dataset, masks_in, read_json, run_refine, temporaries

from dhr_label.io.masks import read_provenance
from dhr_label.runtime.outdir import mask_stats, output_lock, written_since
from dhr_label.runtime.selection import Shard

MANIFEST = "dhr-label-manifest.json"


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path / "in", 4, size=(16, 20))


def test_a_full_run_into_a_folder_of_row_1_masks_is_refused_naming_what_differs(data, tmp_path):
    out = tmp_path / "masks"
    assert run_refine(data, out, "--row", "1").exit_code == 0
    base = masks_in(out)
    result = run_refine(data, out)
    assert result.exit_code == 1
    message = result.stderr
    assert message.startswith(f"error: {out} holds 4 mask(s) made with other settings")
    assert "parameters.steps.init: False -> True" in message and "parameters.steps.uss: False -> True" in message
    assert "--overwrite" in message and "--allow-mixed" in message and "another --out" in message
    assert masks_in(out) == base  # nothing skipped, nothing mixed
    assert len(read_json(out / MANIFEST)["runs"]) == 1  # a refused run records nothing


def test_overwrite_replaces_and_allow_mixed_keeps(data, tmp_path):
    out = tmp_path / "masks"
    assert run_refine(data, out, "--row", "1", "--limit", "2").exit_code == 0
    kept = masks_in(out)
    mixed = run_refine(data, out, "--allow-mixed")
    assert mixed.exit_code == 0, mixed.stderr
    assert last_run(out)["counts"] == {"selected": 4, "done": 2, "skipped": 2, "skipped_other_settings": 2, "failed": 0,
                                       "not_run": 0}
    assert {i: masks_in(out)[i] for i in kept} == kept
    assert last_run(out)["allow_mixed"] is True and last_run(out)["foreign_masks_left"] == 2
    assert "were made with other settings and stay" in mixed.stderr
    again = run_refine(data, out)  # the directory's latest run chose to keep them: resume keeps them
    assert again.exit_code == 0 and last_run(out)["counts"]["skipped"] == 4
    forced = run_refine(data, out, "--overwrite")
    assert forced.exit_code == 0 and last_run(out)["counts"]["done"] == 4
    mine = read_json(out / MANIFEST)["fingerprint_id"]
    assert {read_provenance(p) for p in out.glob("*.png")} == {mine}


def test_masks_without_recorded_settings_are_not_taken_for_this_runs(data, tmp_path):
    out = tmp_path / "masks"
    assert run_refine(data, out, "--limit", "1").exit_code == 0
    (out / MANIFEST).unlink()
    (out / "img_003.png").write_bytes((out / "img_000.png").read_bytes()[:8] + b"not a dhr-label mask")
    result = run_refine(data, out)
    assert result.exit_code == 1
    assert "1 with no recorded settings" in result.stderr


def test_rerunning_a_finished_command_keeps_the_history(data, tmp_path):
    out = tmp_path / "masks"
    assert run_refine(data, out).exit_code == 0
    assert run_refine(data, out).exit_code == 0
    runs = read_json(out / MANIFEST)["runs"]
    assert [r["counts"]["done"] for r in runs] == [4, 0] and [r["counts"]["skipped"] for r in runs] == [0, 4]
    assert runs[0]["fingerprint_id"] == runs[1]["fingerprint_id"]
    assert runs[0]["started_unix"] <= runs[1]["started_unix"]


def test_changed_inputs_change_the_fingerprint(data, tmp_path):
    out = tmp_path / "masks"
    assert run_refine(data, out).exit_code == 0
    first = read_json(out / MANIFEST)["fingerprint_id"]
    with open(data.feats, "ab") as handle:  # a repacked feats file: another size
        handle.write(b"\0" * 16)
    result = run_refine(data, out)
    assert result.exit_code == 1 and "inputs.feats.bytes" in result.stderr
    assert read_json(out / MANIFEST)["fingerprint_id"] == first


def test_the_lock_covers_shards_of_other_runs(data, tmp_path):
    out = tmp_path / "masks"
    out.mkdir()
    with output_lock(out, group="abc/1", run="refine, settings abc, shard 1/1"):
        result = run_refine(data, out, "--shard", "1/2", "--row", "1")
        assert result.exit_code == 1
        assert "another dhr-label run (pid " in result.stderr and "refine, settings abc, shard 1/1" in result.stderr
        assert "only the shards of one --shard split with the same settings may share a directory" in result.stderr
        assert masks_in(out) == {} and not (out / "dhr-label-manifest.shard-1-of-2.json").exists()


def test_shards_of_one_split_share_the_directory(data, tmp_path):
    out = tmp_path / "masks"
    first = run_refine(data, out, "--shard", "1/2")
    assert first.exit_code == 0, first.stderr
    fid = read_json(out / "dhr-label-manifest.shard-1-of-2.json")["fingerprint_id"]
    with output_lock(out, group=f"{fid}/2", shard=Shard(1, 2), run="shard 1"):
        second = run_refine(data, out, "--shard", "2/2")  # the other shard, concurrently
        assert second.exit_code == 0, second.stderr
        same_shard = run_refine(data, out, "--shard", "1/2")
        assert same_shard.exit_code == 1 and "is writing shard 1/2" in same_shard.stderr
    assert sorted(masks_in(out)) == data.ids


def test_a_refused_run_does_not_touch_the_running_runs_temporaries(data, tmp_path):
    out = tmp_path / "masks"
    out.mkdir()
    with output_lock(out, group="other/1", token="aaaa"):
        in_flight = out / ".img_000.png.aaaa-123.dhr-tmp"  # the running run, mid-write
        in_flight.write_bytes(b"half a png")
        refused = run_refine(data, out)
        assert refused.exit_code == 1 and "another dhr-label run" in refused.stderr
        assert in_flight.exists()
    assert not in_flight.exists()  # the owner removes its own temporaries when it ends


def test_stale_temporaries_wait_until_no_run_writes(data, tmp_path):
    out = tmp_path / "masks"
    out.mkdir()
    stale = out / ".img_003.png.dead-456.dhr-tmp"  # from a run killed long ago
    first = run_refine(data, out, "--shard", "1/2")
    fid = read_json(out / "dhr-label-manifest.shard-1-of-2.json")["fingerprint_id"]
    assert first.exit_code == 0
    with output_lock(out, group=f"{fid}/2", shard=Shard(1, 2), token="bbbb"):
        stale.write_bytes(b"old")
        assert run_refine(data, out, "--shard", "2/2").exit_code == 0
        assert stale.exists()  # another run is writing: an unknown temporary may be its own
    assert run_refine(data, out, "--shard", "1/2").exit_code == 0
    assert temporaries(out) == []  # alone in the directory: stale temporaries are removed


def test_written_since_counts_only_masks_renamed_into_place_after(tmp_path):
    (tmp_path / "old.png").write_bytes(b"png")
    (tmp_path / "redone.png").write_bytes(b"png")
    before = mask_stats(tmp_path, ["old", "redone", "new"])
    assert sorted(before) == ["old", "redone"]
    replacement = tmp_path / ".redone.tmp"
    replacement.write_bytes(b"png")
    replacement.replace(tmp_path / "redone.png")  # as an atomic write does: a new inode
    (tmp_path / "new.png").write_bytes(b"png")
    assert written_since(tmp_path, ["old", "redone", "new", "absent"], before) == ["redone", "new"]


def test_a_version_1_manifest_reads_as_history(data, tmp_path):
    out = tmp_path / "masks"
    out.mkdir()
    (out / MANIFEST).write_text(json.dumps({"format": "dhr-label/manifest", "version": "0.1.0", "command": "refine",
                                            "preset": {"name": "voc"}, "parameters": {}, "counts": {"done": 0}}))
    assert run_refine(data, out).exit_code == 0
    runs = read_json(out / MANIFEST)["runs"]
    assert len(runs) == 2 and runs[0]["version"] == "0.1.0" and runs[1]["status"] == "complete"


def _summary_rows(stderr: str) -> dict[str, str]:
    """The refine summary table's rows on stderr, ``{label: value}``."""
    rows = {}
    for line in stderr.splitlines():
        cells = [c.strip() for c in line.strip("│┃║|").split("│") if c.strip()]
        if len(cells) == 2:
            rows[cells[0]] = cells[1]
    return rows


def test_the_summary_counts_masks_of_other_settings_apart(data, tmp_path):
    out = tmp_path / "masks"
    assert run_refine(data, out, "--row", "1", "--limit", "2").exit_code == 0
    mixed = run_refine(data, out, "--allow-mixed", "--limit", "2")  # the two selected masks are row 1's
    assert mixed.exit_code == 0, mixed.stderr
    rows = _summary_rows(mixed.stderr)
    assert rows["done"] == "0" and rows["kept (made earlier with these settings)"] == "0"
    assert rows["kept (made with other settings: a mixed directory)"] == "2"
    assert last_run(out)["counts"]["skipped"] == 2 and last_run(out)["counts"]["skipped_other_settings"] == 2
    resumed = run_refine(data, out, "--allow-mixed")  # two of row 1, two made now
    rows = _summary_rows(resumed.stderr)
    assert rows["done"] == "2" and rows["kept (made with other settings: a mixed directory)"] == "2"
    again = run_refine(data, out)  # two of these settings, two of row 1 (the directory's latest run kept them)
    rows = _summary_rows(again.stderr)
    assert rows["kept (made earlier with these settings)"] == "2"
    assert rows["kept (made with other settings: a mixed directory)"] == "2"
