"""``dhr-label pack``: convert a WSSS pipeline's per-image files into cams.h5 / feats.h5."""
from __future__ import annotations

import contextlib
import enum
import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from ..io.ids import read_ids
from ..io.pack import CAM_STYLES
from ..io.writer import Writer
from ..runtime.outdir import check_writable
from ..runtime.pack import Sources, check_images, pack_images, source_ids
from .app import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, app, err_console, fail, guarded, progress_bar, usage_error

#: Adapted images named one a line before "... and N more".
SHOWN_NOTES = 5


class CamStyleName(str, enum.Enum):
    irn = "irn"
    clip_es = "clip-es"
    psa = "psa"


class KeyConvention(str, enum.Enum):
    foreground = "foreground"
    class_id = "class-id"


class StoredDtype(str, enum.Enum):
    float16 = "float16"
    float32 = "float32"


_DIR = {"exists": True, "file_okay": False, "dir_okay": True}


@app.command("pack")
@guarded
def pack_command(
    cams_npy: Annotated[Optional[Path], typer.Option("--cams-npy", help="Directory of <id>.npy CAM files (layout: --cams-style).", **_DIR)] = None,
    cams_style: Annotated[Optional[CamStyleName], typer.Option("--cams-style", help="Layout of the CAM files: irn {keys, cam, high_res}, clip-es {keys, attn_highres}, psa {key: map}.")] = None,
    cams_array: Annotated[Optional[str], typer.Option("--cams-array", help="Dict entry holding the [K, h, w] maps [default: irn high_res (or cam, stride 4); clip-es attn_highres].")] = None,
    cams_keys: Annotated[Optional[KeyConvention], typer.Option("--cams-keys", help="How the files' class keys count: foreground = index among the non-background classes, VOC id = key + 1 (every style's default); class-id = the dataset class id.")] = None,
    uss_pt: Annotated[Optional[Path], typer.Option("--uss-pt", help="Directory of <id>.pt USS feature tensors [D, h, w].", **_DIR)] = None,
    wss_npy: Annotated[Optional[Path], typer.Option("--wss-npy", help="Directory of <id>.npy WSS features: an array [D, h, w] or a dict {layer: [D, h, w]}.", **_DIR)] = None,
    base: Annotated[Optional[Path], typer.Option("--base", help="Directory of <id>.png base masks (palette or grey class ids), stored in cams.h5.", **_DIR)] = None,
    images: Annotated[Optional[Path], typer.Option("--images", help="Directory of <id>.jpg|.jpeg|.png images, stored in cams.h5.", **_DIR)] = None,
    classes: Annotated[Optional[str], typer.Option("--classes", help="Dataset preset (voc, coco, context, context59, ade, stuff, camvid) or a class-list file; needed with --cams-npy.")] = None,
    ids: Annotated[Optional[Path], typer.Option("--ids", help="Pack only these ids (one a line) [default: every id with a file in --cams-npy, --uss-pt or --wss-npy].", exists=True, dir_okay=False)] = None,
    out_cams: Annotated[Optional[Path], typer.Option("--out-cams", help="cams.h5 to create or append to.", dir_okay=False)] = None,
    out_feats: Annotated[Optional[Path], typer.Option("--out-feats", help="feats.h5 to create or append to (may be the --out-cams file).", dir_okay=False)] = None,
    dtype: Annotated[StoredDtype, typer.Option("--dtype", help="Stored precision of CAMs and features (float32 keeps values beyond +-65504 and full precision).")] = StoredDtype.float16,
    strict: Annotated[bool, typer.Option("--strict", help="Stop at the first image that fails.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the run summary as one JSON document on stdout.")] = False,
) -> None:
    """Convert IRN / CLIP-ES / PSA CAMs, USS and WSS features, base masks and images into
    cams.h5 / feats.h5 (docs/format.md), one image at a time.

    An output file that exists is appended to and images already complete in it are skipped,
    so an interrupted run resumes when the same command runs again. A malformed input file is
    reported with its path and the run goes on. Exit 0 when every image is packed or skipped,
    1 when any failed, 130 when interrupted.
    """
    style = CAM_STYLES[cams_style.value] if cams_style is not None else None
    _check_options(cams_npy, style, cams_array, cams_keys, uss_pt, wss_npy, base, images, classes, out_cams, out_feats)
    sources = Sources(
        cams=cams_npy, style=style, maps_entry=cams_array, keys=cams_keys.value if cams_keys else None,
        uss=uss_pt, wss=wss_npy, base=base, images=images,
    )
    if cams_npy is not None and images is None:
        err_console.print(
            "warning: no --images: cams.h5 will hold no images, and refine will need --images DIR (the CRF needs them)",
            style="yellow", soft_wrap=True, markup=False,
        )
    todo = read_ids(ids) if ids is not None else source_ids(sources)
    if not todo:
        raise fail("nothing to pack: the --cams-npy / --uss-pt / --wss-npy directories hold no <id> file")
    check_images(sources, todo)
    for option, path in (("--out-cams", out_cams), ("--out-feats", out_feats)):
        if path is not None:
            check_writable(path.parent, option)  # created when missing, as refine creates its --out
    counts = {"images": len(todo), "packed": 0, "skipped": 0, "failed": 0}
    failures: list[dict] = []
    notes: dict[str, list[str]] = {}
    interrupted = False
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        cams_writer, feats_writer = _open_writers(stack, classes, out_cams, out_feats, dtype.value)
        try:
            with progress_bar("pack", len(todo)) as advance:
                for outcome in pack_images(todo, sources, cams=cams_writer, feats=feats_writer):
                    counts[outcome.status] += 1
                    advance()
                    if outcome.notes:
                        notes[outcome.image_id] = list(outcome.notes)
                    if outcome.error is not None:
                        error = outcome.error
                        failures.append({"id": error.image_id, "source": error.source, "problem": error.problem})
                        err_console.print(Text.assemble(("failed", "red"), f" {error}"), soft_wrap=True)
                        if strict:
                            break
        except KeyboardInterrupt:
            interrupted = True  # the image being written stays marked incomplete; a rerun redoes it
    seconds = time.perf_counter() - t0
    counts["not_run"] = counts["images"] - counts["packed"] - counts["skipped"] - counts["failed"]
    for image_id, adapted in list(notes.items())[:SHOWN_NOTES]:
        err_console.print(f"note: {image_id}: {'; '.join(adapted)}", markup=False, soft_wrap=True)
    if len(notes) > SHOWN_NOTES:
        err_console.print(f"note: ... and {len(notes) - SHOWN_NOTES} more images adapted (--json lists them)", markup=False)
    _summary(counts, seconds, out_cams, out_feats, failures, interrupted, json_out, notes)
    if interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)
    raise typer.Exit(EXIT_FAILED if failures else EXIT_OK)


def _open_writers(stack, classes, out_cams, out_feats, dtype):
    """The Writers of the run; one ``combined`` Writer when both outputs are the same file."""
    if out_cams is not None and out_feats is not None and out_cams.resolve() == out_feats.resolve():
        writer = stack.enter_context(Writer(out_cams, classes=classes, kind="combined", dtype=dtype))
        return writer, writer
    cams = stack.enter_context(Writer(out_cams, classes=classes, dtype=dtype)) if out_cams is not None else None
    feats = stack.enter_context(Writer(out_feats, kind="feats", dtype=dtype)) if out_feats is not None else None
    return cams, feats


def _check_options(cams_npy, style, cams_array, cams_keys, uss_pt, wss_npy, base, images, classes, out_cams, out_feats) -> None:
    """Rules across options that Typer cannot express; a broken one is a usage error (exit 2)."""
    problems = []
    if cams_npy is None and uss_pt is None and wss_npy is None:
        problems.append("nothing to pack: give --cams-npy, --uss-pt and/or --wss-npy")
    if cams_npy is not None:
        needed = {"--cams-style": style, "--classes": classes, "--out-cams": out_cams}
        missing = [flag for flag, value in needed.items() if value is None]
        if missing:
            problems.append(f"--cams-npy needs {', '.join(missing)}")
    else:
        cam_only = {"--cams-style": style, "--cams-array": cams_array, "--cams-keys": cams_keys, "--base": base,
                    "--images": images, "--classes": classes, "--out-cams": out_cams}
        given = [flag for flag, value in cam_only.items() if value is not None]
        if given:
            problems.append(f"{', '.join(given)} concern CAMs: give --cams-npy too")
    if style is not None and style.maps_entry is None and cams_array is not None:
        problems.append(f"--cams-array does not apply to --cams-style {style.name} (its dict maps each key to a map)")
    if (uss_pt is not None or wss_npy is not None) and out_feats is None:
        problems.append("--uss-pt / --wss-npy need --out-feats")
    if out_feats is not None and uss_pt is None and wss_npy is None:
        problems.append("--out-feats needs --uss-pt and/or --wss-npy")
    if problems:
        raise usage_error("; ".join(problems))


def _summary(counts, seconds, out_cams, out_feats, failures, interrupted, json_out, notes) -> None:
    """The end-of-run summary on stderr, and with ``--json`` one JSON document on stdout."""
    if json_out:
        document = {
            "counts": counts, "seconds": round(seconds, 3), "interrupted": interrupted,
            "out_cams": str(out_cams) if out_cams else None, "out_feats": str(out_feats) if out_feats else None,
            "failures": failures, "notes": notes,
        }
        print(json.dumps(document))
    table = Table(title="dhr-label pack" + (" (interrupted)" if interrupted else ""), show_header=False, title_justify="left")
    table.add_row("packed", str(counts["packed"]))
    table.add_row("skipped (already packed)", str(counts["skipped"]))
    table.add_row("failed", Text(str(counts["failed"]), style="red" if counts["failed"] else ""))
    if counts["not_run"]:
        table.add_row("not run", str(counts["not_run"]))
    table.add_row("time", f"{seconds:.1f} s")
    for name, path in (("cams", out_cams), ("feats", out_feats)):
        if path is not None:
            table.add_row(name, Text(str(path)))
    err_console.print(table)
    if failures:
        err_console.print(f"{len(failures)} image(s) failed; fix the inputs and run the same command again "
                          "(packed images are kept)", markup=False, soft_wrap=True)
