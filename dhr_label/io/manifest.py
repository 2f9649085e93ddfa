"""The run manifest of an output directory: what is in it, and every run that wrote into it.

``<out>/dhr-label-manifest[.shard-I-of-N].json`` (one file per shard of a ``--shard`` split, so
that concurrent shards never write the same file)::

    {"format": "dhr-label/manifest", "manifest_version": 2, "command": "refine",
     "fingerprint_id": "3f9c...", "fingerprint": {...},   # what decides the masks (latest run)
     "preset": {...}, "parameters": {...}, "shard": {"index": 1, "count": 1},
     "runs": [{...}, ...]}                                   # oldest first, never rewritten

A run appends its record when it starts (``"status": "running"``), before any mask is written,
and completes it when it ends; so the directory knows which settings its masks come from even
after a run was killed.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

from .._version import __version__
from .atomic import write_bytes_atomic

MANIFEST_PREFIX = "dhr-label-manifest"
MANIFEST_FORMAT = "dhr-label/manifest"
MANIFEST_VERSION = 2


def manifest_path(out: Path, shard_tag: str = "") -> Path:
    """``<out>/dhr-label-manifest[.shard-I-of-N].json``."""
    return Path(out) / f"{MANIFEST_PREFIX}{shard_tag}.json"


def manifest_files(out: Path) -> list[Path]:
    """Every manifest in ``out`` (the unsharded one and each shard's), sorted by name."""
    return sorted(Path(out).glob(f"{MANIFEST_PREFIX}*.json"))


def now() -> str:
    """The local time as ISO 8601 with its offset, as manifests write it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def describe_file(path: Path | None) -> dict | None:
    """Path, size and modification time of an input (None stays None)."""
    if path is None:
        return None
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return {"path": str(path)}
    entry = {"path": str(path.resolve()), "mtime": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(stat.st_mtime))}
    if path.is_file():
        entry["bytes"] = stat.st_size
    return entry


def environment() -> dict:
    """Tool and platform versions, for reproducibility."""
    return {
        "tool": "dhr-label",
        "version": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": platform.node(),
        "pid": os.getpid(),
    }


def write_manifest(path: Path, manifest: dict) -> None:
    """Write ``manifest`` as indented JSON, atomically."""
    data = json.dumps(manifest, indent=2, sort_keys=False).encode("utf-8") + b"\n"
    write_bytes_atomic(Path(path), data)


def read_manifest(path: Path) -> dict:
    """A manifest written by :func:`write_manifest` (ValueError when it is not one).

    A version-1 manifest (dhr-label 0.1, one run, no history) reads as a version-2 one whose
    only run is that record, without a fingerprint.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a dhr-label manifest (no 'format': {MANIFEST_FORMAT!r})")
    if "runs" not in data:  # version 1
        record = {k: v for k, v in data.items() if k not in ("format", "preset", "parameters", "shard", "command")}
        record.setdefault("status", "interrupted" if data.get("interrupted") else "complete")
        data = {
            "format": MANIFEST_FORMAT, "manifest_version": 1, "command": data.get("command"),
            "fingerprint_id": None, "fingerprint": None, "preset": data.get("preset"),
            "parameters": data.get("parameters"), "shard": data.get("shard"), "runs": [record],
        }
    return data


def new_manifest(command: str, shard: dict, fingerprint_id: str, fingerprint: dict, preset: dict, parameters: dict) -> dict:
    return {
        "format": MANIFEST_FORMAT, "manifest_version": MANIFEST_VERSION, "command": command,
        "fingerprint_id": fingerprint_id, "fingerprint": fingerprint, "preset": preset,
        "parameters": parameters, "shard": shard, "runs": [],
    }


def latest_run(manifest: dict) -> dict:
    """The last run record of a manifest (an empty dict when it has none)."""
    runs = manifest.get("runs") or []
    return runs[-1] if runs else {}


def merge_manifests(manifests: list[dict]) -> dict:
    """One manifest for several shards of the same job: the latest run of each shard, counts
    summed, failures and notes gathered.

    Raises ValueError when the shards disagree on what decides the masks (not one job), or
    when a shard appears twice.
    """
    if not manifests:
        raise ValueError("no manifest to merge")
    first = manifests[0]
    for other in manifests[1:]:
        for key in ("fingerprint_id", "parameters", "preset"):
            if other.get(key) != first.get(key):
                raise ValueError(f"the manifests disagree on {key!r}: not shards of one run")
    shards = [m.get("shard") for m in manifests]
    if len({json.dumps(s, sort_keys=True) for s in shards}) != len(shards):
        raise ValueError(f"a shard appears twice: {shards}")
    merged = {key: first.get(key) for key in ("format", "manifest_version", "command", "fingerprint_id", "fingerprint", "preset", "parameters")}
    latest = [latest_run(m) for m in manifests]
    counts: dict[str, int] = {}
    for run in latest:
        for key, value in (run.get("counts") or {}).items():
            counts[key] = counts.get(key, 0) + int(value)
    merged["counts"] = counts
    merged["failures"] = sorted((f for run in latest for f in run.get("failures", [])), key=lambda f: f["id"])
    notes: dict[str, list[str]] = {}
    for run in latest:
        notes.update(run.get("notes", {}))
    merged["notes"] = dict(sorted(notes.items()))
    merged["shards"] = sorted((s for s in shards if s), key=lambda s: s.get("index", 0))
    expected = {s.get("count") for s in merged["shards"]}
    merged["complete_shards"] = len(expected) == 1 and len(merged["shards"]) == expected.pop()
    merged["interrupted"] = any(run.get("interrupted") for run in latest)
    return merged
