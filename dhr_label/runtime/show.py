"""``show``'s engine: one panel per image — the image, each mask set as a colour overlay with a
legend, the ground truth — drawn by workers (each opens its own files)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DHRLabelError, InputError
from ..io.atomic import write_bytes_atomic
from ..io.contract import CamsFile
from ..io.inputs import find_image, load_image_file
from ..io.masks import read_mask
from ..metrics import confusion_matrix, image_miou
from ..presets import IGNORE_INDEX, Preset
from ..visual import Tile, encode_png, fit_width, missing_tile, overlay, render_panel


@dataclass(frozen=True)
class PanelJob:
    """Everything a worker needs to draw panels (small, picklable)."""

    masks: tuple[Path, ...]
    titles: tuple[str, ...]
    gt: Path | None
    images: Path | None
    cams: Path | None
    out: Path
    preset: Preset
    tile_width: int


@dataclass(frozen=True)
class PanelResult:
    image_id: str
    scores: tuple[float | None, ...]  # per-image mIoU per mask set (None: no GT or no mask)
    missing: tuple[str, ...]  # titles of the mask sets (or "GT") without a mask for this id
    notes: tuple[str, ...]


def draw_chunk(image_ids: list[str], *, job: PanelJob):
    """Draw the panels of a chunk of ids (a worker's task): results, and failures as tuples."""
    done, failed = [], []
    cams = CamsFile.open(job.cams) if job.cams is not None else None
    try:
        for image_id in image_ids:
            try:
                done.append(_draw_one(image_id, job, cams))
            except InputError as exc:  # sent back as a tuple: InputError does not unpickle
                failed.append((exc.image_id, exc.source, exc.problem))
            except DHRLabelError as exc:
                failed.append((image_id, str(job.out), str(exc)))
    finally:
        if cams is not None:
            cams.close()
    return done, failed


def _read_image(image_id: str, job: PanelJob, cams: CamsFile | None, notes: list[str]) -> np.ndarray:
    if job.images is not None:
        path = find_image(job.images, image_id)
        if path is None:
            raise InputError(image_id, str(job.images), f"no image {image_id}.jpg|.jpeg|.png")
        return load_image_file(path, image_id, notes)
    image = cams.read_image(image_id)
    if image is None:
        raise InputError(image_id, f"{job.cams}:/{image_id}/image", "no image in the file; give --images DIR")
    return image


def _read_optional_mask(path: Path, image_id: str, shape) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        mask = read_mask(path)
    except (OSError, ValueError) as exc:
        raise InputError(image_id, str(path), f"cannot read the mask: {exc}") from None
    if mask.shape != tuple(shape):
        raise InputError(image_id, str(path), f"mask is {mask.shape[0]} x {mask.shape[1]} but the image "
                                              f"is {shape[0]} x {shape[1]} (H x W)")
    return mask


def _draw_one(image_id: str, job: PanelJob, cams: CamsFile | None) -> PanelResult:
    notes: list[str] = []
    image = _read_image(image_id, job, cams, notes)
    shape = image.shape[:2]
    gt = _read_optional_mask(job.gt / f"{image_id}.png", image_id, shape) if job.gt else None
    picture = fit_width(image, job.tile_width)
    small = lambda m: fit_width(m, job.tile_width, nearest=True)  # noqa: E731
    tiles = [Tile(f"image {image_id}", picture)]
    scores, missing = [], []
    for directory, title in zip(job.masks, job.titles):
        mask = _read_optional_mask(directory / f"{image_id}.png", image_id, shape)
        if mask is None:
            missing.append(title)
            scores.append(None)
            tiles.append(Tile(f"{title}: no mask", missing_tile(*picture.shape[:2])))
            continue
        score = None
        if gt is not None:
            confusion = confusion_matrix(mask, gt, num_classes=job.preset.num_classes,
                                         ignore_index=IGNORE_INDEX)
            score = image_miou(confusion)
            score = None if math.isnan(score) else score
        scores.append(score)
        label = f"{title}" + (f"  mIoU {100 * score:.1f}" if score is not None else "")
        tiles.append(Tile(label, overlay(picture, small(mask), job.preset.palette), small(mask)))
    if job.gt is not None:
        if gt is None:
            missing.append("GT")
            tiles.append(Tile("GT: no mask", missing_tile(*picture.shape[:2])))
        else:
            tiles.append(Tile("GT", overlay(picture, small(gt), job.preset.palette), small(gt)))
    panel = render_panel(tiles, job.preset.classes, job.preset.palette)
    write_bytes_atomic(job.out / f"{image_id}.png", encode_png(panel))
    return PanelResult(image_id, tuple(scores), tuple(missing), tuple(notes))
