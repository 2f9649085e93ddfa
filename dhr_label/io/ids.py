"""Image ids (docs/format.md, "Image ids"): the file stem used for groups, images and masks."""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import FileLevelError

#: Allowed characters of an id.
ID_PATTERN = re.compile(r"[A-Za-z0-9_.\-]+")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def is_valid_id(image_id) -> bool:
    """Whether ``image_id`` is an id docs/format.md allows: letters, digits, ``_``, ``-``, ``.``
    only (the whole string: no trailing newline either), and not ``.`` or ``..``."""
    return isinstance(image_id, str) and ID_PATTERN.fullmatch(image_id) is not None and image_id not in (".", "..")


def read_ids(path: Path) -> list[str]:
    """The ids of an ``--ids`` file: one a line, blank lines and ``#`` comments skipped.

    Raises
    ------
    FileLevelError
        When the file cannot be read, an id has characters docs/format.md does not allow, an id is
        repeated, or there is none.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FileLevelError(f"cannot read the id list {path}: {exc}") from None
    ids: list[str] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        image_id = line.strip()
        if not image_id or image_id.startswith("#"):
            continue
        if not is_valid_id(image_id):
            raise FileLevelError(
                f"{path}:{number}: id {image_id!r} has characters outside letters, digits, _ - ."
            )
        if image_id in seen:
            raise FileLevelError(f"{path}:{number}: id {image_id!r} is listed twice")
        seen.add(image_id)
        ids.append(image_id)
    if not ids:
        raise FileLevelError(f"the id list {path} holds no id")
    return ids


def mask_files(directory: Path) -> dict[str, Path]:
    """``{id: path}`` of the ``<id>.png`` masks in ``directory`` (not recursive).

    Hidden files (a ``.`` first, as the temporaries of an atomic write) are not masks.
    """
    found: dict[str, Path] = {}
    try:
        entries = list(os.scandir(directory))
    except OSError as exc:
        raise FileLevelError(f"cannot list the mask directory {directory}: {exc.strerror}") from None
    for entry in entries:
        name = entry.name
        if name.startswith(".") or not name.endswith(".png") or not entry.is_file():
            continue
        found[name[: -len(".png")]] = Path(directory) / name
    return dict(sorted(found.items()))


def image_file(directory: Path, image_id: str) -> Path | None:
    """The ``<id>.jpg|.jpeg|.png`` image of ``image_id`` in ``directory``, or None."""
    for suffix in IMAGE_SUFFIXES:
        candidate = Path(directory) / f"{image_id}{suffix}"
        if candidate.is_file():
            return candidate
    return None
