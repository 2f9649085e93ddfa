"""``dhr-label show``: side-by-side panels of images, mask sets and ground truth, and an HTML
index to browse them (worst first when there is ground truth)."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import FileLevelError, InputError
from ..io.atomic import write_bytes_atomic
from ..io.contract import CamsFile
from ..io.ids import mask_files, read_ids
from ..presets import Preset, preset_from_classes, resolve_preset
from ..runtime.outdir import check_writable
from ..runtime.parallel import chunked, default_workers, map_chunks
from ..runtime.show import PanelJob, PanelResult, draw_chunk
from ..visual import index_html
from .app import EXIT_FAILED, EXIT_USAGE, app, err_console, fail, guarded, progress_bar

DirOption = dict(exists=True, file_okay=False, dir_okay=True, readable=True)


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
    check_writable(out, "--out")
    preset = _preset(classes, cams)
    chosen = read_ids(ids) if ids is not None else sorted(set().union(*(mask_files(m) for m in masks)))
    if not chosen:
        raise FileLevelError(f"no <id>.png mask in {', '.join(map(str, masks))}")
    job = PanelJob(tuple(masks), _titles(masks), gt, images, cams if images is None else None,
                   out, preset, tile_width)

    results: list[PanelResult] = []
    failures: list[InputError] = []
    with progress_bar("drawing panels", len(chosen)) as advance:
        for done, failed in map_chunks(partial(draw_chunk, job=job), chunked(chosen, workers=workers),
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
    err_console.print(f"wrote {len(results)} panels and {out / 'index.html'}", soft_wrap=True, markup=False)
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


