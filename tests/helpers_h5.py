"""Tiny, valid cams.h5 / feats.h5 pairs (docs/format.md v1) with a synthetic scene, for tests.

Every image is a known scene: the pixels are split into a grid of rectangles, one per class
(the background first when the dataset has one, then the tags), each painted a flat colour
with a little noise. From that truth map the generator derives what an upstream pipeline
would hand to dhr-label: raw CAMs (a blurred, noisy indicator per tag at the CAM's own
resolution), a base mask (the truth, optionally with one tag lost to the background), USS
and WSS features (one random direction per class plus noise, at their own resolutions).

Tests that need a broken input build the records with :func:`make_records`, damage one, and
write them with :func:`write_cams` / :func:`write_feats`; :func:`make_dataset` does all of it
for the common case. Everything is seeded: the same arguments give the same bytes.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

FORMAT_CAMS = "dhr-label/cams"
FORMAT_FEATS = "dhr-label/feats"
IGNORE = 255

def preset_classes(preset: str) -> tuple[list[str], int | None]:
    """Class names and background id of a dataset preset, as dhr-label knows them."""
    from dhr_label.presets import PRESETS

    chosen = PRESETS[preset]
    return list(chosen.classes), chosen.background


def truth_map(size: tuple[int, int], order: list[int]) -> np.ndarray:
    """An H x W uint8 map split into a near-square grid of rectangles, ``order[i]`` in cell i.

    Cells beyond ``len(order)`` take ``order[0]``. Every class gets at least one pixel when
    the image has at least as many pixels as there are classes.
    """
    height, width = size
    n = len(order)
    rows = max(1, math.ceil(math.sqrt(n * height / max(width, 1))))
    rows = min(rows, n)
    cols = math.ceil(n / rows)
    cell_row = (np.arange(height) * rows) // height
    cell_col = (np.arange(width) * cols) // width
    index = cell_row[:, None] * cols + cell_col[None, :]
    lookup = np.array(order + [order[0]] * (rows * cols - n), dtype=np.uint8)
    return lookup[index]


def sample_grid(values: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Nearest-cell sampling of a [..., H, W] array onto an h x w grid (cell centres)."""
    height, width = values.shape[-2:]
    rows = np.minimum(((np.arange(grid[0]) + 0.5) * height / grid[0]).astype(int), height - 1)
    cols = np.minimum(((np.arange(grid[1]) + 0.5) * width / grid[1]).astype(int), width - 1)
    return values[..., rows[:, None], cols[None, :]]


def _features(truth: np.ndarray, grid, dim: int, directions: np.ndarray, rng, noise: float) -> np.ndarray:
    cells = sample_grid(truth, grid)
    feats = directions[cells].transpose(2, 0, 1)  # D x h x w
    return (feats + noise * rng.standard_normal(feats.shape)).astype(np.float32)


def make_records(
    n_images: int = 3,
    *,
    size: tuple[int, int] = (24, 32),
    tags: list[int] | list[list[int]] | None = None,
    num_classes: int = 21,
    background: int | None = 0,
    ids: list[str] | None = None,
    cam_grid: tuple[int, int] | None = None,
    feat_grid: tuple[int, int] | None = None,
    feat_dim: int = 8,
    wss_layers: tuple[str, ...] | None = ("C4", "C5"),
    lose_tag: bool = True,
    with_base: bool = True,
    with_image: bool = True,
    seed: int = 0,
) -> dict[str, dict]:
    """One record per image: ``cam``, ``labels``, ``base``, ``image``, ``uss``, ``wss``, ``truth``.

    Parameters
    ----------
    tags : list of int, or one list per image
        The image-level tags; default: two foreground classes chosen per image.
    cam_grid, feat_grid : (h, w)
        Resolutions of the CAMs and features; default: half the image (at least 1 x 1).
    wss_layers : tuple of str or None
        Names of the WSS layers (a group of datasets); None writes one ``wss`` dataset.
    lose_tag : bool
        The base mask loses the last tag of every image (to the background, or to the first
        tag without background), so that Step 1's recovery has work to do.
    """
    rng = np.random.default_rng(seed)
    ids = ids or [f"img_{i:03d}" for i in range(n_images)]
    height, width = size
    half = (max(1, height // 2), max(1, width // 2))
    cam_grid = cam_grid or half
    feat_grid = feat_grid or half
    foreground = [c for c in range(num_classes) if c != background]
    uss_dirs = rng.standard_normal((256, feat_dim))
    wss_dirs = rng.standard_normal((256, feat_dim))
    colours = rng.integers(0, 256, size=(256, 3))
    records: dict[str, dict] = {}
    for index, image_id in enumerate(ids):
        if tags is None:
            chosen = sorted(rng.choice(foreground, size=min(2, len(foreground)), replace=False).tolist())
        elif tags and isinstance(tags[0], (list, tuple)):
            chosen = sorted(tags[index])
        else:
            chosen = sorted(tags)
        order = ([background] if background is not None else []) + chosen
        truth = truth_map(size, order)
        image = colours[truth] + rng.integers(-6, 7, size=(height, width, 3))
        image = np.clip(image, 0, 255).astype(np.uint8)
        indicator = np.stack([(truth == t).astype(np.float32) for t in chosen])
        cam = sample_grid(indicator, cam_grid) * 3.0 - 0.5
        cam = (cam + 0.2 * rng.standard_normal(cam.shape)).astype(np.float32)
        base = truth.copy()
        if lose_tag and len(order) > 1:
            base[base == chosen[-1]] = order[0]
        record = {
            "cam": cam,
            "labels": np.asarray(chosen, dtype=np.int64),
            "truth": truth,
            "uss": _features(truth, feat_grid, feat_dim, uss_dirs, rng, 0.1),
        }
        wss = {name: _features(truth, feat_grid, feat_dim, wss_dirs, rng, 0.1) for name in (wss_layers or ())}
        record["wss"] = wss if wss_layers else _features(truth, feat_grid, feat_dim, wss_dirs, rng, 0.1)
        if with_base:
            record["base"] = base
        if with_image:
            record["image"] = image
        records[image_id] = record
    return records


def write_cams(
    path: Path,
    records: dict[str, dict],
    *,
    classes: list[str],
    background: int | None,
    ignore_index: int = IGNORE,
    fmt: str = FORMAT_CAMS,
    version: int = 1,
) -> Path:
    """Write the cams side of ``records`` (cam, labels, base, image when present)."""
    with h5py.File(path, "a") as handle:
        handle.attrs["format"] = fmt
        handle.attrs["version"] = version
        handle.attrs["classes"] = json.dumps(classes)
        handle.attrs["background"] = -1 if background is None else background
        handle.attrs["ignore_index"] = ignore_index
        for image_id, record in records.items():
            group = handle.require_group(image_id)
            for name in ("cam", "labels", "base", "image"):
                if name in record and record[name] is not None:
                    group.create_dataset(name, data=record[name])
    return Path(path)


def write_feats(path: Path, records: dict[str, dict], *, fmt: str = FORMAT_FEATS, version: int = 1) -> Path:
    """Write the feats side of ``records`` (uss, and wss as a dataset or a group of layers)."""
    with h5py.File(path, "a") as handle:
        if "format" not in handle.attrs:
            handle.attrs["format"] = fmt
            handle.attrs["version"] = version
        for image_id, record in records.items():
            group = handle.require_group(image_id)
            if record.get("uss") is not None:
                group.create_dataset("uss", data=record["uss"])
            wss = record.get("wss")
            if isinstance(wss, dict):
                layers = group.create_group("wss")
                for name, layer in wss.items():
                    layers.create_dataset(name, data=layer)
            elif wss is not None:
                group.create_dataset("wss", data=wss)
    return Path(path)


@dataclass
class Dataset:
    """Paths and contents of a generated pair."""

    cams: Path
    feats: Path
    ids: list[str]
    classes: list[str]
    background: int | None
    records: dict[str, dict] = field(repr=False)


def make_dataset(
    directory: Path,
    n_images: int = 3,
    *,
    preset: str = "voc",
    background: int | None | str = "preset",
    records: dict[str, dict] | None = None,
    combined: bool = False,
    **record_options,
) -> Dataset:
    """Write ``cams.h5`` and ``feats.h5`` (or one ``data.h5`` when ``combined``) in ``directory``.

    ``preset`` picks the class names (and the background unless ``background`` is given);
    ``records`` (from :func:`make_records`) replaces the generated ones; other keyword
    arguments go to :func:`make_records`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    classes, preset_background = preset_classes(preset)
    if background == "preset":
        background = preset_background
    if records is None:
        records = make_records(n_images, num_classes=len(classes), background=background, **record_options)
    cams = directory / ("data.h5" if combined else "cams.h5")
    feats = cams if combined else directory / "feats.h5"
    write_cams(cams, records, classes=classes, background=background)
    write_feats(feats, records)
    return Dataset(cams, feats, list(records), classes, background, records)


def make_many_groups(path: Path, n_groups: int, *, size: tuple[int, int] = (8, 8), seed: int = 0) -> list[str]:
    """A combined cams+feats file with ``n_groups`` valid images, cheaply.

    One real image group is written, and every other id is a hard link to it: the file holds
    ``n_groups`` distinct names (what listing ids costs) for a few megabytes, in seconds.
    Returns the ids in sorted order.
    """
    classes, background = preset_classes("voc")
    records = make_records(1, size=size, tags=[15], ids=["id_0000000"], background=background, seed=seed)
    write_cams(path, records, classes=classes, background=background)
    write_feats(path, records)
    names = [f"id_{i:07d}" for i in range(n_groups)]
    with h5py.File(path, "a") as handle:
        target = handle[names[0]].id
        links = handle.id.links
        for name in names[1:]:
            links.create_hard(name.encode(), target, b".")
    return names


# ----------------------------------------------------------------------------------------------
# Running refine on a generated pair
# ----------------------------------------------------------------------------------------------
TMP_SUFFIX = ".dhr-tmp"


def refine_args(data: Dataset, out: Path, *extra: str, workers: int = 1) -> list[str]:
    """``refine`` arguments for ``data`` into ``out`` (one worker unless told otherwise)."""
    return [
        "refine", "--cams", str(data.cams), "--feats", str(data.feats), "--out", str(out),
        "--workers", str(workers), *extra,
    ]


def run_refine(data: Dataset, out: Path, *extra: str, workers: int = 1, root: tuple[str, ...] = ()):
    """``dhr-label [root] refine ...`` in this process; the click ``Result`` (stdout and
    stderr apart)."""
    from typer.testing import CliRunner

    from dhr_label.cli import app

    return CliRunner().invoke(app, [*root, *refine_args(data, out, *extra, workers=workers)])


def cli_command() -> list[str]:
    """The command line of ``dhr-label`` for a subprocess, with this interpreter."""
    import sys

    return [sys.executable, "-m", "dhr_label"]


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def masks_in(out: Path) -> dict[str, bytes]:
    """``{id: PNG bytes}`` of the masks in ``out`` (hidden files are not masks)."""
    return {p.stem: p.read_bytes() for p in sorted(Path(out).glob("*.png")) if not p.name.startswith(".")}


def temporaries(out: Path) -> list[str]:
    """Names of leftover temporaries of atomic writes in ``out``."""
    return sorted(p.name for p in Path(out).iterdir() if p.name.endswith(TMP_SUFFIX)) if Path(out).exists() else []


def last_run(out: Path, name: str = "dhr-label-manifest.json") -> dict:
    """The latest run record of the manifest in ``out``."""
    return read_json(Path(out) / name)["runs"][-1]


def process_children(pid: int) -> list[int]:
    """The pids of the live child processes of ``pid`` (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def pixels_in(out: Path) -> dict[str, bytes]:
    """``{id: decoded class ids}`` of the masks in ``out``: what a trainer reads, whatever the
    PNG's metadata (the provenance text differs between runs on different input files)."""
    from PIL import Image

    return {p.stem: np.asarray(Image.open(p)).tobytes() + repr(Image.open(p).size).encode()
            for p in sorted(Path(out).glob("*.png")) if not p.name.startswith(".")}
