"""``dhr-label inspect``: check inputs against docs/format.md before a long run."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from ..presets import resolve_preset
from ..runtime.inspect import InspectReport, inspect_inputs
from .app import EXIT_FAILED, app, err_console, fail, guarded, out_console, percent, print_json, progress_bar

#: Findings listed one a line on stderr before "... and N more".
SHOWN_FINDINGS = 200

FileArg = dict(exists=True, file_okay=True, dir_okay=False, readable=True)
DirOption = dict(exists=True, file_okay=False, dir_okay=True, readable=True)


@app.command()
@guarded
def inspect(
    cams: Annotated[Path, typer.Argument(help="cams.h5 (the format: docs/format.md of dhr-label).", **FileArg)],
    feats: Annotated[Optional[Path], typer.Argument(help="feats.h5 (may be cams.h5 itself).", **FileArg)] = None,
    images: Annotated[Optional[Path], typer.Option("--images", help="Images <id>.jpg|.jpeg|.png, instead of the image datasets.", **DirOption)] = None,
    base: Annotated[Optional[Path], typer.Option("--base", help="Base masks <id>.png, instead of the base datasets.", **DirOption)] = None,
    classes: Annotated[Optional[str], typer.Option("--classes", help="Dataset preset or class-list file the file's classes must match (default: take the file's).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print exactly one JSON document on stdout instead of tables.")] = False,
) -> None:
    """Validate cams.h5 [feats.h5] against docs/format.md and summarise them: format and version,
    classes, every id's datasets, shapes, dtypes, label ranges, NaN/Inf, ids in one file and
    not the other, missing images or base masks. Exit 1 with the list when anything is wrong.
    """
    preset = resolve_preset(classes) if classes is not None else None
    with progress_bar(f"inspecting {cams.name}", None) as advance:
        report = inspect_inputs(
            cams, feats, images_dir=images, base_dir=base, preset=preset,
            on_image=advance, on_total=advance.total,
        )
    if json_out:
        print_json({"tool": "dhr-label inspect", **report.to_dict()})
    else:
        _print_summary(report)
    _print_findings(report)
    errors = report.errors
    if errors:
        images_hit = len({f.image_id for f in errors if f.image_id is not None})
        about = f" concerning {images_hit} ids" if images_hit else ""  # a file-level error concerns no id
        raise fail(f"{len(errors)} errors{about} ({report.images} images in {cams.name})", EXIT_FAILED)
    err_console.print(f"ok: {report.images} images match the format (contract v1)"
                      + (f" ({len(report.warnings)} warnings)" if report.warnings else ""))


def _print_findings(report: InspectReport) -> None:
    """Errors one a line (the first SHOWN_FINDINGS); warnings grouped by what they say."""
    errors = report.errors
    for finding in errors[:SHOWN_FINDINGS]:
        err_console.print(f"error: {finding}", style="red", soft_wrap=True, markup=False)
    if len(errors) > SHOWN_FINDINGS:
        err_console.print(f"... and {len(errors) - SHOWN_FINDINGS} more errors (--json lists all)")
    grouped: dict[str, list[str]] = {}
    for finding in report.warnings:
        grouped.setdefault(finding.problem, []).append(finding.image_id or finding.source)
    for problem, where in grouped.items():
        shown = ", ".join(where[:3]) + (f" and {len(where) - 3} more" if len(where) > 3 else "")
        err_console.print(f"warning: {problem} ({len(where)} images: {shown})", style="yellow",
                          soft_wrap=True, markup=False)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _top(counter: dict, limit: int = 3) -> str:
    items = list(counter.items())
    text = ", ".join(f"{key} ({n})" for key, n in items[:limit])
    return text + (f", ... {len(items) - limit} more" if len(items) > limit else "")


def _print_summary(report: InspectReport) -> None:
    data = report.to_dict()
    files = Table(title="files")
    for name in ("path", "format", "version", "size", "groups"):
        files.add_column(name, justify="right" if name in ("size", "groups") else "left",
                         overflow="fold")
    for f in data["files"]:
        files.add_row(Text(f["path"]), str(f["format"]), str(f["version"]), _size(f["bytes"]), str(f["groups"]))
    out_console.print(files)

    c = data["classes"]
    out_console.print(
        f"classes: {c['count']} (preset {c['preset']}), background "
        f"{c['background'] if c['background'] is not None else 'none'}, ignore {c['ignore_index']}",
        markup=False, soft_wrap=True)
    out_console.print(
        f"images: {data['images']}; " + ", ".join(f"{k} {v}" for k, v in sorted(data["counts"].items())),
        markup=False, soft_wrap=True)
    out_console.print(f"image sizes (H x W): {_top(data['image_sizes'])}", markup=False, soft_wrap=True)
    tags = report.tags_per_image
    if tags:
        ks = sorted(tags.elements())
        out_console.print(f"tags per image: min {ks[0]}, median {ks[len(ks) // 2]}, max {ks[-1]}",
                          markup=False)

    datasets = Table(title="datasets (shape dtype: images)")
    for name in ("dataset", "shapes", "compression"):
        datasets.add_column(name)
    for name, shapes in data["datasets"].items():
        datasets.add_row(name, _top(shapes), _top(data["compression"].get(name, {})))
    out_console.print(datasets)

    frequency = Table(title="class frequency")
    frequency.add_column("class")
    frequency.add_column("tagged images", justify="right")
    frequency.add_column("base pixels %", justify="right")
    for row in data["class_frequency"]:
        frequency.add_row(Text(row["name"]), str(row["tagged_images"]), percent(row["base_pixel_share"], 2))
    out_console.print(frequency)
    out_console.print(f"{data['errors']} errors, {data['warnings']} warnings", markup=False)
