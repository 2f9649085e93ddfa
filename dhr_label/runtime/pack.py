"""``pack``'s engine: the streaming loop that brings a WSSS pipeline's per-image files into the
contract through :class:`~dhr_label.io.writer.Writer`, one image at a time (constant memory).
The readers of those files are :mod:`dhr_label.io.pack`."""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import FileLevelError, InputError
from ..io.contract import check_id
from ..io.ids import IMAGE_SUFFIXES, image_file
from ..io.pack import CamStyle, read_base, read_cams, read_features, read_rgb
from ..io.writer import Writer


@dataclass(frozen=True)
class Sources:
    """The input directories of one ``pack`` run (None: not given)."""

    cams: Path | None = None
    style: CamStyle | None = None
    maps_entry: str | None = None
    keys: str | None = None
    uss: Path | None = None
    wss: Path | None = None
    base: Path | None = None
    images: Path | None = None

    def primaries(self) -> list[tuple[Path, str]]:
        """The per-image file directories that define the ids, with their file suffix."""
        pairs = [(self.cams, ".npy"), (self.uss, ".pt"), (self.wss, ".npy")]
        return [(directory, suffix) for directory, suffix in pairs if directory is not None]


def stems(directory: Path, suffix: str) -> list[str]:
    """Sorted stems of the ``*<suffix>`` files (and links) of ``directory``, hidden ones skipped."""
    try:
        with os.scandir(directory) as entries:
            found = [
                e.name[: -len(suffix)]
                for e in entries
                # a broken link is listed too: reading it then reports the file as missing
                if e.name.endswith(suffix) and not e.name.startswith(".") and (e.is_file() or e.is_symlink())
            ]
    except OSError as exc:
        raise FileLevelError(f"cannot list {directory}: {exc.strerror}") from None
    return sorted(found)


def source_ids(sources: Sources) -> list[str]:
    """Every id that has a file in one of the per-image directories, sorted."""
    ids: set[str] = set()
    for directory, suffix in sources.primaries():
        ids.update(stems(directory, suffix))
    return sorted(ids)


def check_images(sources: Sources, ids: list[str]) -> None:
    """One :class:`FileLevelError` when ``--images`` holds the image of none of ``ids`` (a wrong
    directory), instead of one failed image per id. One lookup when the first is there."""
    if sources.cams is None or sources.images is None or not ids:
        return
    if not any(image_file(sources.images, i) is not None for i in ids):
        raise FileLevelError(f"--images {sources.images}: no <id>{'|'.join(IMAGE_SUFFIXES)} of any of the {len(ids)} "
                             f"ids to pack (first: {ids[0]}); is it the right directory?")


@dataclass(frozen=True)
class Outcome:
    """What happened to one image: ``packed``, ``skipped`` (already complete) or ``failed``."""

    image_id: str
    status: str
    error: InputError | None = None
    notes: tuple[str, ...] = ()  # what was adapted (e.g. a squeezed batch axis)


def pack_images(ids, sources: Sources, *, cams: Writer | None, feats: Writer | None) -> Iterator[Outcome]:
    """Pack ``ids`` one at a time (constant memory); yield one :class:`Outcome` per id.

    An image complete in every output is skipped without reading its inputs. All of an
    image's inputs are read and validated before either file is written. ``cams`` and
    ``feats`` may be one ``combined`` Writer (one file for both sides).
    """
    combined = cams is not None and cams is feats
    for image_id in ids:
        need_cams = cams is not None and image_id not in cams
        need_feats = feats is not None and image_id not in feats
        if not (need_cams or need_feats):
            yield Outcome(image_id, "skipped")
            continue
        try:
            check_id(image_id, str(_first_file(sources, image_id)))
            cams_item = _cams_inputs(image_id, sources, cams) if need_cams else None
            notes: list[str] = []
            feats_item = _feats_inputs(image_id, sources, notes) if need_feats else None
            if combined:
                cams.add(image_id, **cams_item, **feats_item)
            else:
                if cams_item is not None:
                    cams.add(image_id, **cams_item)
                if feats_item is not None:
                    feats.add(image_id, **feats_item)
        except InputError as exc:
            yield Outcome(image_id, "failed", exc)
            continue
        yield Outcome(image_id, "packed", notes=tuple(notes))


def _first_file(sources: Sources, image_id: str) -> Path:
    directory, suffix = sources.primaries()[0]
    return directory / f"{image_id}{suffix}"


def _cams_inputs(image_id: str, sources: Sources, writer: Writer) -> dict:
    space = {"num_classes": len(writer.classes), "background": writer.background}
    cam, labels = read_cams(
        sources.cams / f"{image_id}.npy", image_id, sources.style,
        maps_entry=sources.maps_entry, keys=sources.keys, **space,
    )
    item = {"cam": cam, "labels": labels}
    if sources.base is not None:
        path = sources.base / f"{image_id}.png"
        item["base"] = read_base(path, image_id, num_classes=len(writer.classes), ignore_index=writer.ignore_index)
    if sources.images is not None:
        path = image_file(sources.images, image_id)
        if path is None:
            wanted = "|".join(IMAGE_SUFFIXES)
            raise InputError(image_id, str(sources.images / f"{image_id}{wanted}"), "no image file found")
        item["image"] = read_rgb(path, image_id)
        if "base" in item and item["base"].shape != item["image"].shape[:2]:
            raise InputError(
                image_id,
                str(sources.base / f"{image_id}.png"),
                f"expected the size of {path.name}, H x W {list(item['image'].shape[:2])}, "
                f"found {list(item['base'].shape)}",
            )
    return item


def _feats_inputs(image_id: str, sources: Sources, notes: list[str]) -> dict:
    item = {}
    if sources.uss is not None:
        item["uss"] = read_features(sources.uss / f"{image_id}.pt", image_id, "pt", notes)
    if sources.wss is not None:
        item["wss"] = read_features(sources.wss / f"{image_id}.npy", image_id, "npy", notes)
    return item
