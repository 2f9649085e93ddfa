"""What decides a mask, and what an output directory already holds.

A run's *fingerprint* is everything that decides its masks: the tool version, every algorithm
parameter (the CRF backend and, for the torch backend, the device type, whose last bits
differ), the classes, and the identities of the input files (name, size and modification
time: content hashes of 100-GB feature files are out of reach). Its *id* is a short hash of
it, stored in every mask PNG and in the manifest; so a later run knows which of a directory's
masks it may keep, and says what differs when they are not its own.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..._version import __version__
from ...io.ids import mask_files
from ...io.manifest import manifest_files, read_manifest
from ...io.masks import read_provenance
from ...params import CRFBackend, DHRParams
from ...presets import Preset


def file_identity(path: Path | None) -> dict | None:
    """Name, size and modification time of an input file; a directory by its path."""
    if path is None:
        return None
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return {"name": path.name}
    if path.is_dir():
        return {"directory": str(path.resolve())}
    return {"name": path.name, "bytes": stat.st_size, "mtime": int(stat.st_mtime)}


def fingerprint(
    *, params: DHRParams, preset: Preset, cams: Path, feats: Path | None, images: Path | None, base: Path | None, device: str,
    prototypes: Path | None = None,
) -> dict:
    """The fingerprint of a refine run (JSON-ready). ``prototypes``: a prototypes file given
    instead of pooling them (pooled ones follow from the inputs and are not listed)."""
    torch_crf = params.crf.backend is CRFBackend.torch
    value = {
        "tool": __version__,
        "parameters": params.to_dict(),
        "crf_device": device if torch_crf else "cpu",
        "classes": {"names": list(preset.classes), "background": preset.background},
        "inputs": {
            "cams": file_identity(cams),
            "feats": file_identity(feats) if params.steps.needs_features else None,
            "images": file_identity(images),
            "base": file_identity(base),
        },
    }
    if params.uses_prototypes and prototypes is not None:
        value["inputs"]["prototypes"] = file_identity(prototypes)
    return value


def fingerprint_id(value: dict) -> str:
    """16 hex digits of the SHA-256 of the canonical JSON of ``value``."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def differences(recorded: dict | None, current: dict) -> list[str]:
    """``key: recorded -> current`` for every entry that differs (dotted keys, down to where
    the two stop being mappings)."""
    if recorded is None:
        return ["the masks come from a run that recorded no fingerprint (dhr-label before 0.2, or another tool)"]
    found: list[str] = []
    _compare(recorded, current, "", found)
    return found


def _compare(old, new, prefix: str, found: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            _compare(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key, found)
    elif old != new:
        found.append(f"{prefix}: {_short(old)} -> {_short(new)}")


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class DirectoryState:
    """What an output directory holds: its masks' provenance and its latest run."""

    provenance: dict[str, str | None] = field(default_factory=dict)  # mask id -> fingerprint id
    latest: dict = field(default_factory=dict)  # the latest run record over every manifest
    fingerprints: dict[str, dict] = field(default_factory=dict)  # fingerprint id -> fingerprint

    @property
    def target(self) -> str | None:
        """The fingerprint id of the latest run into the directory (what it is being made of)."""
        return self.latest.get("fingerprint_id")

    def foreign(self, mine: str) -> list[str]:
        """The masks not made with fingerprint ``mine``, sorted."""
        return sorted(i for i, p in self.provenance.items() if p != mine)

    def describe_foreign(self, mine: str) -> str:
        """``12 with settings 3f9c..., 3 with no recorded settings`` for messages."""
        counts = Counter(self.provenance[i] for i in self.foreign(mine))
        parts = [f"{n} with {('settings ' + str(p)) if p else 'no recorded settings'}" for p, n in counts.most_common()]
        return ", ".join(parts)


def read_directory(out: Path) -> DirectoryState:
    """Read every mask's provenance and every manifest of ``out`` (a few tens of µs a mask)."""
    state = DirectoryState()
    for image_id, path in mask_files(out).items():
        state.provenance[image_id] = read_provenance(path)
    runs = []
    for path in manifest_files(out):
        try:
            manifest = read_manifest(path)
        except (OSError, ValueError):
            continue
        if manifest.get("fingerprint_id"):
            state.fingerprints[manifest["fingerprint_id"]] = manifest.get("fingerprint")
        for run in manifest.get("runs", []):
            state.fingerprints.setdefault(run.get("fingerprint_id"), manifest.get("fingerprint"))
            runs.append(run)
    runs.sort(key=lambda r: r.get("started_unix") or 0.0)
    state.latest = runs[-1] if runs else {}
    return state
