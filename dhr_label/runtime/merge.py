"""``merge-manifests``' engine: one manifest for the shards of a ``refine --shard I/N`` job."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from ..errors import DHRLabelError
from ..io.manifest import MANIFEST_PREFIX, environment, latest_run, manifest_path, merge_manifests, read_manifest, write_manifest

SHARD_FILE = re.compile(re.escape(MANIFEST_PREFIX) + r"\.shard-(\d+)-of-(\d+)\.json$")
#: Per-run fields a merged manifest keeps per shard (each shard ran on its own host and time).
PER_RUN = ("host", "pid", "started", "seconds", "status", "interrupted", "strict_stop", "error", "selection", "engine")


def shard_files(directory: Path) -> list[Path]:
    """Every ``dhr-label-manifest.shard-I-of-N.json`` in ``directory``, by N then I."""
    found = []
    for path in directory.iterdir():
        name = SHARD_FILE.match(path.name)
        if name:
            found.append((int(name[2]), int(name[1]), path))
    return [path for _, _, path in sorted(found)]


def problems_of(merged: dict, manifests: list[dict]) -> list[str]:
    """Why the merged run is not complete and clean (empty when it is)."""
    problems = []
    counts = {s.get("count") for s in merged["shards"]}
    if len(counts) > 1:
        problems.append(f"the shards come from different splits (N = {sorted(counts)}): not one job")
    else:
        total = counts.pop()
        present = {s.get("index") for s in merged["shards"]}
        missing = sorted(set(range(1, total + 1)) - present)
        if missing:
            problems.append(f"{len(missing)} of {total} shard manifest(s) missing: shard(s) {', '.join(map(str, missing))}")
    for manifest in manifests:
        shard, run = manifest.get("shard") or {}, latest_run(manifest)
        name = f"shard {shard.get('index')}/{shard.get('count')}"
        not_run = int((run.get("counts") or {}).get("not_run", 0))
        if run.get("interrupted"):
            problems.append(f"{name} was interrupted ({not_run} image(s) not run)")
        elif run.get("error"):
            problems.append(f"{name} stopped: {run['error']}")
        elif not_run:
            problems.append(f"{name} left {not_run} image(s) not run")
    failed = int(merged["counts"].get("failed", 0))
    if failed:
        problems.append(f"{failed} image(s) failed")
    return problems


def merge_directory(out_dir: Path) -> tuple[dict, list[str], Path]:
    files = shard_files(out_dir)
    if not files:
        raise DHRLabelError(f"no {MANIFEST_PREFIX}.shard-I-of-N.json in {out_dir}: nothing to merge")
    manifests = []
    for path in files:
        try:
            manifest = read_manifest(path)
        except (OSError, ValueError) as exc:
            raise DHRLabelError(f"{path}: cannot read this manifest: {exc}") from None
        name = SHARD_FILE.match(path.name)
        expected = {"index": int(name[1]), "count": int(name[2])}
        if manifest.get("shard") != expected:
            raise DHRLabelError(f"{path}: the file name says shard {expected}, its content says {manifest.get('shard')}")
        manifests.append(manifest)
    try:
        merged = merge_manifests(manifests)
    except ValueError as exc:
        raise DHRLabelError(f"cannot merge the manifests in {out_dir}: {exc}") from None
    merged["shard_runs"] = [
        {"shard": m["shard"], **{key: latest_run(m).get(key) for key in PER_RUN}, "counts": latest_run(m).get("counts", {})}
        for m in manifests
    ]
    merged["runs"] = []  # a merged manifest records no run of its own: the shards' are above
    merged["merged"] = {
        **environment(),
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": [path.name for path in files],
    }
    problems = problems_of(merged, manifests)
    merged["complete"] = not problems
    target = manifest_path(out_dir)
    if target.exists():
        try:
            previous = json.loads(target.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = None
        if not isinstance(previous, dict) or "shard_runs" not in previous:
            raise DHRLabelError(
                f"{target} exists and is not a merged manifest (an unsharded run wrote into {out_dir}?); move it away first"
            )
    try:
        write_manifest(target, merged)
    except OSError as exc:
        raise DHRLabelError(f"cannot write {target}: {exc.strerror or exc}") from None
    return merged, problems, target
