"""``dhr-label show``: side-by-side panels of images, mask sets and ground truth, and an HTML
index to browse them (worst first when there is ground truth)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from ..errors import DHRLabelError, FileLevelError, InputError
from ..io.atomic import write_bytes_atomic
from ..io.contract import CamsFile
from ..io.ids import mask_files, read_ids
from ..io.inputs import find_image, load_image_file
from ..io.masks import read_mask
from ..metrics import confusion_matrix, image_miou
from ..presets import IGNORE_INDEX, Preset, preset_from_classes, resolve_preset
from ..runtime.parallel import chunked, default_workers, map_chunks
from ..visual import Tile, encode_png, fit_width, index_html, missing_tile, overlay, render_panel
from .app import EXIT_FAILED, EXIT_USAGE, app, err_console, fail, guarded, out_console, progress_bar

DirOption = dict(exists=True, file_okay=False, dir_okay=True, readable=True)


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


@app.command()
@guarded
def show(
    masks: Annotated[list[Path], typer.Option("--masks", help="A mask directory <id>.png; repeat for side-by-side sets.", **DirOption)],
    out: Annotated[Path, typer.Option("--out", help="Where the panels <id>.png and index.html go.", file_okay=False)] = Path("panels"),
    images: Annotated[Optional[Path], typer.Option("--images", help="Images <id>.jpg|.jpeg|.png (default: the images inside --cams).", **DirOption)] = None,
    cams: Annotated[Optional[Path], typer.Option("--cams", help="cams.h5 whose image datasets are used when --images is absent.", exists=True, dir_okay=False)] = None,
    gt: Annotated[Optional[Path], typer.Option("--gt", help="Ground-truth masks: a GT tile, per-image mIoU, worst-first order.", **DirOption)] = None,
    ids: Annotated[Optional[Path], typer.Option("--ids", help="Only these ids (one a line); default: every id with a mask in some --masks.", exists=True, dir_okay=False)] = None,
    classes: Annotated[Optional[str], typer.Option("--classes", help="Dataset preset or class-list file (default: the classes of --cams, else voc).")] = None,
    tile_width: Annotated[int, typer.Option("--tile-width", min=64, help="Pictures wider than this are scaled down.")] = 640,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Worker processes (default: all cores).")] = default_workers(),
) -> None:
    """Draw one panel per image — the image, each mask set as a colour overlay with a legend of
    the classes present, the ground truth — and an index.html laying them out.
    """
    if images is None and cams is None:
        raise fail("no image source: give --images DIR or --cams cams.h5 (whose images are used)",
                   EXIT_USAGE)
    preset = _preset(classes, cams)
    chosen = read_ids(ids) if ids is not None else sorted(set().union(*(mask_files(m) for m in masks)))
    if not chosen:
        raise FileLevelError(f"no <id>.png mask in {', '.join(map(str, masks))}")
    out.mkdir(parents=True, exist_ok=True)
    job = PanelJob(tuple(masks), _titles(masks), gt, images, cams if images is None else None,
                   out, preset, tile_width)

    results: list[PanelResult] = []
    failures: list[InputError] = []
    with progress_bar("drawing panels", len(chosen)) as advance:
        for done, failed in map_chunks(partial(_draw_chunk, job=job), chunked(chosen, workers=workers),
                                       workers=workers, on_done=lambda chunk, _: advance(len(chunk))):
            results.extend(done)
            failures.extend(InputError(*f) for f in failed)

    entries = _index_entries(results, with_scores=gt is not None)
    page = index_html(entries, title=f"dhr-label show: {', '.join(job.titles)}",
                      columns=list(job.titles), sorted_by=job.titles[0] + " mIoU" if gt else None)
    write_bytes_atomic(out / "index.html", page.encode("utf-8"))
    _report_missing(results)
    for note in sorted({n for r in results for n in r.notes}):
        err_console.print(f"note: {note}", soft_wrap=True, markup=False)
    out_console.print(f"wrote {len(results)} panels and {out / 'index.html'}", soft_wrap=True, markup=False)
    if failures:
        for failure in sorted(failures, key=lambda f: f.image_id):
            err_console.print(f"error: {failure}", style="red", soft_wrap=True, markup=False)
        raise fail(f"{len(failures)} of {len(chosen)} images could not be drawn", EXIT_FAILED)


def _preset(classes: str | None, cams: Path | None) -> Preset:
    if classes is not None:
        return resolve_preset(classes)
    if cams is not None:
        with CamsFile.open(cams) as cf:
            return preset_from_classes(cf.classes, cf.background)
    return resolve_preset("voc")


def _titles(masks: list[Path]) -> tuple[str, ...]:
    """Names of the mask sets: the directory names, or the paths where names repeat."""
    names = [m.name or str(m) for m in masks]
    return tuple(str(m) if names.count(n) > 1 else n for m, n in zip(masks, names))


def _index_entries(results: list[PanelResult], *, with_scores: bool) -> list[dict]:
    def worst_first(r: PanelResult):
        first = r.scores[0] if r.scores else None
        return (first is None, first if first is not None else 0.0, r.image_id)

    ordered = sorted(results, key=worst_first if with_scores else (lambda r: r.image_id))
    return [{"id": r.image_id, "file": f"{r.image_id}.png",
             "scores": list(r.scores) if with_scores else []} for r in ordered]


def _report_missing(results: list[PanelResult]) -> None:
    missing: dict[str, list[str]] = {}
    for r in results:
        for title in r.missing:
            missing.setdefault(title, []).append(r.image_id)
    for title, where in missing.items():
        shown = ", ".join(where[:5]) + (f" and {len(where) - 5} more" if len(where) > 5 else "")
        err_console.print(f"warning: {len(where)} images have no mask in {title} (drawn as a grey "
                          f"tile): {shown}", style="yellow", soft_wrap=True, markup=False)


# -- worker side ----------------------------------------------------------------------------
def _draw_chunk(image_ids: list[str], *, job: PanelJob):
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
