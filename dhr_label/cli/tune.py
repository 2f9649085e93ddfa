"""``dhr-label tune``: the parameters that suit your data, chosen on your labelled images.

Parse the grid into settings, run :func:`~dhr_label.runtime.tune.run_tune`, report: a table on
stdout (or one JSON document), ``params.json`` for ``refine --params``, plots and a page.
"""
from __future__ import annotations

import html
import itertools
import json
import math
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.table import Table
from rich.text import Text

from ..errors import DHRLabelError
from ..io.atomic import write_bytes_atomic
from ..metrics.crossval import OBJECTIVES, rank_key
from ..params import DHRParams, Steps
from ..plots import Series, render_chart
from ..presets import resolve_preset
from ..runtime.tune import TuneReport, TuneRequest, run_tune
from ..visual import encode_png
from .app import app, err_console, guarded, out_console, percent, print_json, progress_bar, usage_error
from .options import field_of, getattr_dotted, parse_value
from .refine import read_params_file

#: Variants listed in the table (the best ones; --json and report.json list all).
SHOWN_VARIANTS = 25


def parse_grid(specs: list[str]) -> list[tuple[str, list]]:
    """``["tau=0.5,0.7", "cap=soft,majority"]`` -> ``[("tau", [0.5, 0.7]), ("cap", ["soft", "majority"])]``."""
    axes = []
    for spec in specs:
        name, sep, values = spec.partition("=")
        if not sep or not values.strip():
            raise usage_error(f"expected NAME=V1,V2,..., found {spec!r}", "--grid")
        try:
            dotted = field_of(name)
        except ValueError as exc:
            raise usage_error(str(exc), "--grid") from None
        if any(dotted == a for a, _ in axes):
            raise usage_error(f"{name} is given twice", "--grid")
        axes.append((dotted, [parse_value(v) for v in values.split(",")]))
    return axes


def parse_samples(specs: list[str]) -> list[tuple[str, float, float, bool]]:
    """``["tau=0.5:0.95", "marginal-floor=0.001:0.1:log"]`` -> ranges to draw from."""
    ranges = []
    for spec in specs:
        name, sep, body = spec.partition("=")
        parts = body.split(":")
        if not sep or len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
            raise usage_error(f"expected NAME=LOW:HIGH or NAME=LOW:HIGH:log, found {spec!r}", "--sample")
        try:
            dotted, low, high = field_of(name), float(parts[0]), float(parts[1])
        except ValueError as exc:
            raise usage_error(str(exc), "--sample") from None
        log = len(parts) == 3
        if not low < high or (log and low <= 0):
            raise usage_error(f"{spec!r}: expected LOW < HIGH (and LOW > 0 for :log)", "--sample")
        ranges.append((dotted, low, high, log))
    return ranges


def settings_of(axes, ranges, samples: int, seed: int, base: DHRParams) -> list[dict]:
    """Every grid point, crossed with ``samples`` random points of the ranges."""
    grid = [dict(zip([a for a, _ in axes], values)) for values in itertools.product(*[v for _, v in axes])] or [{}]
    if not ranges:
        return grid
    rng = np.random.default_rng(seed)
    drawn = []
    for _ in range(samples):
        point = {}
        for dotted, low, high, log in ranges:
            value = float(np.exp(rng.uniform(np.log(low), np.log(high)))) if log else float(rng.uniform(low, high))
            point[dotted] = round(value) if isinstance(getattr_dotted(base, dotted), int) else round(value, 6)
        drawn.append(point)
    return [{**g, **d} for g in grid for d in drawn]


@app.command("tune")
@guarded
def tune_command(
    cams: Annotated[Path, typer.Option("--cams", help="cams.h5 (as for refine).", dir_okay=False)],
    gt: Annotated[Path, typer.Option("--gt", help="Ground-truth masks <id>.png of the images to tune on (255 = ignore).", exists=True, file_okay=False)],
    feats: Annotated[Optional[Path], typer.Option("--feats", help="feats.h5 (as for refine).", dir_okay=False)] = None,
    out: Annotated[Path, typer.Option("--out", help="Where params.json, report.json, report.html and the plots go.", file_okay=False)] = Path("tune"),
    grid: Annotated[Optional[list[str]], typer.Option("--grid", help="NAME=V1,V2,... : values to try for a parameter (a refine option name such as tau, marginal-floor, crf-bi-compat, or a dotted field such as ot.eps); repeat for a product grid.")] = None,
    sample: Annotated[Optional[list[str]], typer.Option("--sample", help="NAME=LOW:HIGH[:log] : a range to draw --samples random values from (crossed with the grid).")] = None,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Random points drawn from the --sample ranges.")] = 8,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random points and of the fold assignment.")] = 0,
    folds: Annotated[int, typer.Option("--folds", min=2, help="k of k-fold cross-validation over the images.")] = 2,
    objective: Annotated[str, typer.Option("--objective", help=f"What to choose by: {', '.join(OBJECTIVES)} (vanished: fewest vanished pairs).")] = "miou",
    params_file: Annotated[Optional[Path], typer.Option("--params", help="Start from these parameters (a params.json); the grid varies them.", exists=True, dir_okay=False)] = None,
    row: Annotated[Optional[int], typer.Option("--row", min=1, max=7, help="Ablation row of Table 6 the grid runs on [default: 7].", show_default=False)] = None,
    classes: Annotated[Optional[str], typer.Option("--classes", help="Dataset preset or class-list file (default: the file's classes).")] = None,
    images: Annotated[Optional[Path], typer.Option("--images", help="Directory of <id>.jpg|.png images (wins over the file's).", exists=True, file_okay=False)] = None,
    base: Annotated[Optional[Path], typer.Option("--base", help="Directory of <id>.png base masks (wins over the file's).", exists=True, file_okay=False)] = None,
    ids: Annotated[Optional[Path], typer.Option("--ids", help="Tune on these ids only (one a line; default: every id with ground truth).", exists=True, dir_okay=False)] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", "-j", min=1, help="Worker processes (default: all cores).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Discard the counts of an earlier tune run in --out.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as one JSON document on stdout.")] = False,
) -> None:
    """Try a grid of DHR parameters on labelled images and choose by k-fold cross-validation.

    Step 1 is computed once per Step-1 setting and reused by every Steps 2-3 variant; each
    variant is scored exactly (as score does: mIoU, vanished pairs). The setting chosen on the
    other folds is scored on each held-out fold, so the report says what the choice is expected
    to give on unseen images. The choice on all images goes to OUT/params.json, which
    refine --params reads. A killed run resumes from the images already done.
    """
    if objective not in OBJECTIVES:
        raise usage_error(f"expected one of {', '.join(OBJECTIVES)}, found {objective!r}", "--objective")
    try:
        preset = resolve_preset(classes) if classes else None
    except DHRLabelError as exc:
        raise usage_error(str(exc), "--classes") from None
    start = read_params_file(params_file) if params_file else DHRParams()
    if row is not None:
        start = start.replace(steps=Steps.row(row))
    axes, ranges = parse_grid(grid or []), parse_samples(sample or [])
    if not axes and not ranges:
        raise usage_error("nothing to tune: give --grid NAME=V1,V2 and/or --sample NAME=LOW:HIGH", "--grid")
    settings = settings_of(axes, ranges, samples, seed, start)
    try:
        variants = tuple(start.with_values(s) for s in settings)
    except ValueError as exc:
        raise usage_error(str(exc), "--grid") from None
    if any(v.steps.needs_features for v in variants) and feats is None:
        raise usage_error("Steps 2/3 use USS/WSS features: give --feats, or --row 4 for Step 1 alone", "--feats")
    request = TuneRequest(cams, feats, gt, out, variants, tuple(settings), preset, images, base, ids, workers,
                          folds, seed, objective, overwrite)
    with progress_bar(f"tune ({len(variants)} settings)", None) as advance:
        report = run_tune(request, on_start=lambda todo, done: advance.total(todo), on_result=lambda r: advance())
    written = _write_page(out, report, axes + [(d, None) for d, *_ in ranges], objective)
    document = json.loads((out / "report.json").read_text())
    if json_out:
        print_json({"tool": "dhr-label tune", **document, "files": [str(p) for p in written]})
    else:
        _print(report, objective)
    err_console.print(f"wrote {out / 'params.json'} (refine --params reads it), {out / 'report.html'} and "
                      f"{len(written) - 1} plots; {report.images} images in {folds} folds, {report.seconds:.0f} s",
                      soft_wrap=True, markup=False)
    if report.without_gt:
        err_console.print(f"note: {len(report.without_gt)} image(s) of {cams} have no ground truth in {gt} and were not used",
                          soft_wrap=True, markup=False)


def _describe(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items()) or "(defaults)"


def _print(report: TuneReport, objective: str) -> None:
    cv = report.cv
    order = sorted(range(len(report.settings)), key=lambda i: _rank(report.totals[i], objective))
    table = Table(title=Text(f"tune: {len(report.settings)} settings on {report.images} images, by {objective} (all images)"))
    for name in ("setting", "mIoU", "vanished", "fwIoU"):
        table.add_column(name, justify="left" if name == "setting" else "right")
    for i in order[:SHOWN_VARIANTS]:
        t = report.totals[i]
        table.add_row(Text(_describe(report.settings[i]) + ("  <- chosen" if i == cv.chosen else "")),
                      percent(_nan(t["miou"]), 2), f"{t['vanished']}/{t['pairs']}", percent(_nan(t["fwiou"]), 2))
    out_console.print(table)
    folds = Table(title=Text(f"{len(cv.folds)}-fold cross-validation: chosen on the other folds, scored on the held-out one"))
    for name in ("fold", "images", "mIoU held out", "vanished held out", "mIoU others"):
        folds.add_column(name, justify="right", no_wrap=True)
    folds.add_column("chosen on the others", justify="left", overflow="fold", min_width=16)  # the one that may wrap
    for fold, size in zip(cv.folds, report.fold_sizes):
        folds.add_row(str(fold.index + 1), str(size), percent(_nan(fold.held_out["miou"]), 2),
                      f"{fold.held_out['vanished']}/{fold.held_out['pairs']}", percent(_nan(fold.in_sample["miou"]), 2),
                      Text(_describe(report.settings[fold.chosen])))
    folds.add_row("pooled", str(report.images), percent(_nan(cv.pooled["miou"]), 2),
                  f"{cv.pooled['vanished']}/{cv.pooled['pairs']}", "", "", style="bold")
    out_console.print(folds)
    out_console.print(f"chosen on all images: {_describe(report.settings[cv.chosen])} — mIoU {percent(_nan(cv.in_sample['miou']), 2)} "
                      f"in sample, {percent(_nan(cv.pooled['miou']), 2)} expected on unseen images (pooled held-out folds)",
                      soft_wrap=True, markup=False)


def _nan(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _rank(score: dict, objective: str):
    """Sort key, best first."""
    return tuple(-x for x in rank_key(score, objective))


def _write_page(out: Path, report: TuneReport, axes: list, objective: str) -> list[Path]:
    """One chart per varied parameter and score (every setting, the best per value, the choice
    ringed), and report.html showing them with the tables."""
    (out / "plots").mkdir(exist_ok=True)
    written, chosen = [], report.settings[report.cv.chosen]
    for dotted, _ in axes:
        values = [s.get(dotted) for s in report.settings]
        categories = sorted({str(v) for v in values}) if any(isinstance(v, (str, bool)) for v in values) else None
        position = (lambda v: float(categories.index(str(v)))) if categories else float
        for score, label in (("miou", "mIoU (%)"), ("vanished", "vanished pairs")):
            scale = 100.0 if score == "miou" else 1.0
            points = [(position(v), scale * (_nan(t[score]) if _nan(t[score]) is not None else math.nan))
                      for v, t in zip(values, report.totals)]
            bests = {}
            for (x, y), t in zip(points, report.totals):
                if x not in bests or _rank(t, objective) < _rank(bests[x][1], objective):
                    bests[x] = ((x, y), t)
            chart = render_chart(
                [Series("every setting", tuple(points), (170, 170, 170), radius=2),
                 Series(f"best by {objective}", tuple(p for p, _ in bests.values()), line=True)],
                title=f"{label} against {dotted}", x_label=dotted, y_label=label, categories=categories,
                marked=(position(chosen.get(dotted)), points[report.cv.chosen][1]),
            )
            path = out / "plots" / f"{dotted.replace('.', '-')}-{score}.png"
            write_bytes_atomic(path, encode_png(chart))
            written.append(path)
    page = _page(report, written, objective)
    write_bytes_atomic(out / "report.html", page.encode("utf-8"))
    return written + [out / "report.html"]


def _page(report: TuneReport, plots: list[Path], objective: str) -> str:
    esc, cv = html.escape, report.cv

    def pct(value):
        value = _nan(value)
        return "-" if value is None else f"{100 * value:.2f}"

    rows = "".join(
        f"<tr><td>{esc(_describe(s))}{' <b>(chosen)</b>' if i == cv.chosen else ''}</td><td>{pct(t['miou'])}</td>"
        f"<td>{t['vanished']}/{t['pairs']}</td><td>{pct(t['fwiou'])}</td></tr>"
        for i, (s, t) in sorted(enumerate(zip(report.settings, report.totals)), key=lambda x: _rank(x[1][1], objective)))
    folds = "".join(
        f"<tr><td>{f.index + 1}</td><td>{esc(_describe(report.settings[f.chosen]))}</td><td>{pct(f.held_out['miou'])}</td>"
        f"<td>{f.held_out['vanished']}/{f.held_out['pairs']}</td></tr>" for f in cv.folds)
    images = "".join(f'<img src="plots/{esc(p.name)}" alt="{esc(p.stem)}">' for p in plots)
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>dhr-label tune</title>"
        "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:2px 6px;text-align:right}td:first-child{text-align:left}img{margin:4px;border:1px solid #ddd}</style>"
        f"</head><body><h1>dhr-label tune</h1><p>{report.images} images, {len(cv.folds)} folds, objective {esc(objective)}. "
        f"Chosen on all images: <b>{esc(_describe(report.settings[cv.chosen]))}</b>: mIoU {pct(cv.in_sample['miou'])} in "
        f"sample; expected on unseen images (pooled held-out folds): mIoU {pct(cv.pooled['miou'])}, vanished "
        f"{cv.pooled['vanished']}/{cv.pooled['pairs']}.</p><h2>Cross-validation</h2><table><tr><th>held-out fold</th>"
        f"<th>chosen on the others</th><th>mIoU</th><th>vanished</th></tr>{folds}</table><h2>Plots</h2>{images}"
        f"<h2>Every setting (all images)</h2><table><tr><th>setting</th><th>mIoU</th><th>vanished</th><th>fwIoU</th></tr>"
        f"{rows}</table></body></html>\n"
    )
