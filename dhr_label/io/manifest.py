"""The run manifest: what was run, on what, with which parameters, and how it went."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

from .atomic import write_bytes_atomic

MANIFEST_PREFIX = "dhr-label-manifest"
MANIFEST_FORMAT = "dhr-label/manifest"


def manifest_path(out: Path, shard_tag: str = "") -> Path:
    """``<out>/dhr-label-manifest[.shard-I-of-N].json``."""
    return Path(out) / f"{MANIFEST_PREFIX}{shard_tag}.json"


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
    from .. import __version__

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
    """A manifest written by :func:`write_manifest` (ValueError when it is not one)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a dhr-label manifest (no 'format': {MANIFEST_FORMAT!r})")
    return data


def merge_manifests(manifests: list[dict]) -> dict:
    """One manifest for several shards of the same run: counts summed, lists concatenated.

    Raises ValueError when the shards disagree on parameters or inputs (not one run), or when
    a shard appears twice.
    """
    if not manifests:
        raise ValueError("no manifest to merge")
    first = manifests[0]
    for other in manifests[1:]:
        for key in ("parameters", "preset"):
            if other.get(key) != first.get(key):
                raise ValueError(f"the manifests disagree on {key!r}: not shards of one run")
        if [i.get("path") for i in (other.get("inputs") or {}).values() if i] != [
            i.get("path") for i in (first.get("inputs") or {}).values() if i
        ]:
            raise ValueError("the manifests disagree on their input files: not shards of one run")
    shards = [m.get("shard") for m in manifests]
    if len({json.dumps(s) for s in shards}) != len(shards):
        raise ValueError(f"a shard appears twice: {shards}")
    merged = {key: value for key, value in first.items() if key not in ("counts", "failures", "notes", "shard", "timing")}
    counts: dict[str, int] = {}
    for manifest in manifests:
        for key, value in manifest.get("counts", {}).items():
            counts[key] = counts.get(key, 0) + int(value)
    merged["counts"] = counts
    merged["failures"] = sorted((f for m in manifests for f in m.get("failures", [])), key=lambda f: f["id"])
    notes: dict[str, list[str]] = {}
    for manifest in manifests:
        notes.update(manifest.get("notes", {}))
    merged["notes"] = dict(sorted(notes.items()))
    merged["shards"] = sorted((s for s in shards if s), key=lambda s: s.get("index", 0))
    expected = {s.get("count") for s in merged["shards"]}
    merged["complete_shards"] = len(expected) == 1 and len(merged["shards"]) == expected.pop()
    merged["interrupted"] = any(m.get("interrupted") for m in manifests)
    return merged
