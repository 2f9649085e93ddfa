"""``dhr-label score``: how good are my masks? Exact scores against ground truth."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.table import Table
from rich.text import Text

from ..errors import DHRLabelError, FileLevelError
from ..io.atomic import write_bytes_atomic
from ..io.ids import read_ids
from ..io.manifest import MANIFEST_PREFIX, read_manifest
from ..metrics.report import ScoreRun, compare_report, score_report
from ..presets import IGNORE_INDEX, Preset, preset_from_classes, resolve_preset
from ..runtime.outdir import check_writable
from ..runtime.parallel import default_workers
from ..runtime.score import Matching, first_ids, ground_truth, made_ids, match, missing_error, score_pairs, select, settings_mix
from ..visual import encode_png, render_confusion
from .app import DEFAULT_MASKS_DIR, app, err_console, guarded, out_console, percent, print_json, progress_bar, usage_error

#: Failures listed one a line before "... and N more".
SHOWN_FAILURES = 50

DirOption = dict(exists=True, file_okay=False, dir_okay=True, readable=True)


@app.command()
@guarded
def score(
    gt: Annotated[Path, typer.Option("--gt", help="Ground-truth masks <id>.png (255 = ignore).", **DirOption)],
    pred: Annotated[Path, typer.Option("--pred", help="Predicted masks <id>.png (refine's --out).", **DirOption)] = DEFAULT_MASKS_DIR,
    classes: Annotated[Optional[str], typer.Option("--classes", help="Dataset preset (voc, coco, context, context59, ade, stuff, camvid) or a class-list file. Default: the classes refine recorded in PRED's manifest, else voc.", show_default=False)] = None,
    ids: Annotated[Optional[Path], typer.Option("--ids", help="Score only these ids (one a line); default: every ground-truth mask.", exists=True, dir_okay=False)] = None,
    made: Annotated[bool, typer.Option("--made", help="Score only the images refine made or tried in PRED, from its manifest (a partial run: --limit, --ids, --shard, interrupted); those it failed count as missing.")] = False,
    allow_missing: Annotated[bool, typer.Option("--allow-missing", help="Score a ground truth without prediction as all-wrong (reported) instead of failing.")] = False,
    compare: Annotated[Optional[Path], typer.Option("--compare", help="A second prediction directory to report side by side (deltas = PRED - COMPARE).", **DirOption)] = None,
    top: Annotated[int, typer.Option("--top", min=0, help="With --compare: how many images that gained and lost most to list.")] = 10,
    json_out: Annotated[bool, typer.Option("--json", help="Print exactly one JSON document on stdout instead of tables.")] = False,
    csv_dir: Annotated[Optional[Path], typer.Option("--csv", help="Also write per-class, per-image and confusion CSVs and a confusion PNG here.", file_okay=False)] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Worker processes (default: all cores).")] = default_workers(),
) -> None:
    """Score predicted masks against ground truth: mIoU, per-class IoU, precision, recall,
    accuracies, fwIoU, FP/FN rates and the vanished (image, class) rate, from exact int64
    confusion matrices. A ground truth without prediction is an error unless --allow-missing;
    --made scores only the images refine made in PRED.
    """
    if made and ids is not None:
        raise usage_error("--made and --ids both choose the images to score: give one of them")
    if csv_dir is not None:
        check_writable(csv_dir, "--csv")  # before the work, not after it
    recorded = _recorded_preset(pred)
    if classes:
        try:
            preset = resolve_preset(classes)
        except DHRLabelError as exc:
            raise usage_error(str(exc), "--classes") from None
        if recorded is not None and list(recorded.classes) != list(preset.classes):
            err_console.print(
                f"warning: --classes {classes} ({preset.num_classes} classes) differs from the classes refine recorded "
                f"in {pred}'s manifest ({recorded.name}, {recorded.num_classes} classes); scoring with --classes",
                style="yellow", soft_wrap=True, markup=False,
            )
    elif recorded is not None:
        preset = recorded
    else:
        err_console.print(f"note: no --classes and no refine manifest in {pred}: scoring with the voc classes", soft_wrap=True)
        preset = resolve_preset("voc")
    all_gt = ground_truth(gt)
    chosen = all_gt if ids is None else select(all_gt, read_ids(ids), gt_dir=gt)
    if made:
        chosen = _made(pred, all_gt, gt)
    matchings = [match(chosen, d, known=set(all_gt)) for d in [pred] + ([compare] if compare else [])]
    for matching in matchings:
        if matching.missing and not allow_missing:
            raise missing_error(matching, made=made and matching is matchings[0])
    reports, runs, warnings = [], [], []
    for matching in matchings:
        _notes(matching)
        warnings += _mixed(matching)
        run = _run(matching, preset, workers)
        runs.append(run)
        reports.append(score_report(run, matching, preset, gt_dir=gt))
    comparison = compare_report(reports[0], reports[1], top=top) if compare else None

    if csv_dir is not None:
        written = _write_csvs(csv_dir, reports[0], runs[0].confusion, comparison)
        err_console.print(f"wrote {', '.join(str(p) for p in written)}", soft_wrap=True)
    if json_out:
        document = dict(reports[0], warnings=warnings)
        if comparison is not None:
            document["comparison"] = comparison
        print_json(document)
        return
    _print_scores(reports[0], preset)
    if comparison is not None:
        _print_comparison(comparison, reports[0], reports[1], preset)


def _notes(matching: Matching) -> None:
    if matching.unknown:
        err_console.print(
            f"note: {len(matching.unknown)} masks in {matching.pred_dir} have no ground truth and "
            f"are not scored (first: {first_ids(matching.unknown)})", soft_wrap=True,
        )
    if matching.missing:
        err_console.print(
            f"warning: {len(matching.missing)} of {len(matching.pairs)} ground-truth masks have no "
            f"prediction in {matching.pred_dir}; scored as all-wrong "
            f"(first: {first_ids(matching.missing)})", style="yellow", soft_wrap=True,
        )


def _made(pred: Path, all_gt: dict[str, Path], gt: Path) -> dict[str, Path]:
    """The ground truth of the images refine made or tried in ``pred`` (``--made``)."""
    wanted = made_ids(pred)
    chosen = {i: all_gt[i] for i in wanted if i in all_gt}
    if not chosen:
        raise FileLevelError(f"--made: none of the {len(wanted)} images refine made in {pred} has a ground truth in {gt} "
                             f"(first: {first_ids(wanted)}; ground truth: {first_ids(list(all_gt))})")
    err_console.print(f"note: --made: scoring the {len(chosen)} images refine made or tried in {pred} "
                      f"({len(all_gt)} ground-truth masks in {gt})", soft_wrap=True, markup=False)
    return chosen


def _mixed(matching: Matching) -> list[str]:
    """A warning (printed, and returned for --json) when the scored masks of a directory were
    made with several settings: the score blends them."""
    mix = settings_mix(matching)
    if len(mix) < 2:
        return []
    parts = ", ".join(f"{n} with {'settings ' + fid if fid else 'no recorded settings'}" for fid, n in mix.most_common())
    warning = (f"{matching.pred_dir} mixes masks made with {len(mix)} settings ({parts}): this score blends them "
               "(refine --overwrite, or another --out, makes them one setting's)")
    err_console.print(f"warning: {warning}", style="yellow", soft_wrap=True, markup=False)
    return [warning]


def _recorded_preset(pred: Path) -> Preset | None:
    """The classes refine wrote into ``pred``'s manifest (None without one)."""
    for path in sorted(pred.glob(f"{MANIFEST_PREFIX}*.json")):
        try:
            recorded = read_manifest(path).get("preset") or {}
        except (OSError, ValueError):
            continue
        if recorded.get("classes"):
            background = recorded.get("background")
            return preset_from_classes(recorded["classes"], background, name=recorded.get("name", "manifest"))
    return None


def _run(matching: Matching, preset: Preset, workers: int) -> ScoreRun:
    with progress_bar(f"scoring {matching.pred_dir}", len(matching.pairs)) as advance:
        run = score_pairs(matching.pairs, num_classes=preset.num_classes,
                          ignore_index=IGNORE_INDEX, workers=workers, on_images=advance)
    if run.failures:
        for failure in run.failures[:SHOWN_FAILURES]:
            err_console.print(f"error: {failure}", style="red", soft_wrap=True, markup=False)
        if len(run.failures) > SHOWN_FAILURES:
            err_console.print(f"... and {len(run.failures) - SHOWN_FAILURES} more", style="red")
        error = DHRLabelError(
            f"{len(run.failures)} of {len(matching.pairs)} images in {matching.pred_dir} could "
            "not be scored; no score is printed, since one over the rest would mislead"
        )
        error.details = {"failures": [{"id": f.image_id, "source": f.source, "problem": f.problem} for f in run.failures]}
        raise error
    return run


def _vanished(row: dict) -> str:
    return f"{row['vanished_pairs']}/{row['eligible_pairs']}" if row["eligible_pairs"] else "-"


def _print_scores(report: dict, preset: Preset) -> None:
    images = report["images"]
    table = Table(
        title=Text(f"{report['pred']} vs {report['gt']}: {images['scored']} images, preset {preset.name}"),
        caption="% per class; FPR = FP/(FP+TN), FNR = FN/(FN+TP); FP/U, FN/U: over the union "
        "(PSA/IRN/DHR code); vanished: pairs with IoU < 0.1 / GT pairs >= 0.1 % of the image",
    )
    table.add_column("class")
    for name in ("IoU", "prec", "recall", "FPR", "FNR", "FP/U", "FN/U"):
        table.add_column(name, justify="right")
    table.add_column("vanished", justify="right")
    for row in report["per_class"]:
        if not row["present"]:
            table.add_row(Text(row["name"]), "absent", *[""] * 6, "-", style="dim")
            continue
        table.add_row(Text(row["name"]), *(percent(row[k]) for k in (
            "iou", "precision", "recall", "fpr", "fnr", "fp_union", "fn_union")), _vanished(row))
    out_console.print(table)

    s = report["summary"]
    v = s["vanished"]
    lines = [
        f"mIoU {percent(s['miou'], 2)}  (over {s['classes_present']} classes present in GT or "
        f"prediction; absent ones excluded)",
        f"pixel accuracy {percent(s['pixel_accuracy'], 2)}   mean accuracy "
        f"{percent(s['mean_accuracy'], 2)}   mean precision {percent(s['mean_precision'], 2)}   "
        f"fwIoU {percent(s['fwiou'], 2)}",
        f"mean FPR {percent(s['mean_fpr'], 2)}   mean FNR {percent(s['mean_fnr'], 2)}   "
        f"mean FP/U {percent(s['mean_fp_union'], 2)}   mean FN/U {percent(s['mean_fn_union'], 2)}",
        f"vanished {v['vanished']} of {v['pairs']} (image, class) pairs ({percent(v['rate'])} %)",
        f"images: {images['scored']} scored, {images['missing']} missing (scored as all-wrong), "
        f"{images['unknown_pred']} predictions without ground truth; "
        f"{s['invalid_pred_pixels']} labelled pixels predicted with no class id",
    ]
    for line in lines:
        out_console.print(line, soft_wrap=True, markup=False)


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}"


def _print_comparison(comparison: dict, report: dict, other: dict, preset: Preset) -> None:
    pred, comp = report["pred"], other["pred"]
    table = Table(
        title=Text(f"PRED {pred} vs COMPARE {comp} (delta = PRED - COMPARE)"),
        caption="vanished: (image, class) pairs with IoU < 0.1 / GT pairs; rescued: pairs vanished in COMPARE, not in "
        "PRED; lost: vanished in PRED, not in COMPARE (vanished delta = lost - rescued)",
    )
    table.add_column("class")
    for name in ("IoU COMPARE", "IoU PRED", "IoU delta", "vanished COMPARE", "vanished PRED", "vanished delta", "rescued",
                 "lost"):
        table.add_column(name, justify="right")
    for row, mine, theirs in zip(comparison["per_class"], report["per_class"], other["per_class"]):
        changed = mine["eligible_pairs"] > 0
        table.add_row(Text(row["name"]), percent(row["iou_compare"]), percent(row["iou"]), _signed(row["delta_iou"]),
                      _vanished(theirs), _vanished(mine), *((f"{row['delta_vanished_pairs']:+d}", str(row["rescued_pairs"]),
                      str(row["lost_pairs"])) if changed else ("-", "-", "-")))
    s, v = comparison["summary"], comparison["vanished"]
    table.add_row("mIoU / all pairs", percent(s["miou"]["compare"], 2), percent(s["miou"]["pred"], 2),
                  _signed(s["miou"]["delta"]),
                  f"{v['compare']['vanished']}/{v['compare']['pairs']}", f"{v['pred']['vanished']}/{v['pred']['pairs']}",
                  f"{v['delta']:+d}", str(v["rescued"]), str(v["lost"]), style="bold", end_section=True)
    out_console.print(table)
    i = comparison["images"]
    out_console.print(
        f"vanished pairs: COMPARE {v['compare']['vanished']} of {v['compare']['pairs']}, PRED "
        f"{v['pred']['vanished']} of {v['pred']['pairs']} ({v['delta']:+d}: PRED rescued {v['rescued']} that COMPARE "
        f"lost, and lost {v['lost']} that COMPARE kept)", soft_wrap=True, markup=False)
    out_console.print(
        f"images by per-image mIoU: {i['better']} better, {i['worse']} worse, {i['same']} the same",
        soft_wrap=True, markup=False)
    for title, rows in (("gained most", i["gained_most"]), ("lost most", i["lost_most"])):
        if not rows:
            continue
        ranked = Table(title=f"{title} (image mIoU %)")
        ranked.add_column("id")
        for name in ("COMPARE", "PRED", "delta"):
            ranked.add_column(name, justify="right")
        for r in rows:
            ranked.add_row(r["id"], percent(r["miou_compare"]), percent(r["miou"]),
                           _signed(r["delta_miou"]))
        out_console.print(ranked)


# -- --csv DIR ----------------------------------------------------------------------------
CLASS_COLUMNS = (
    "id", "name", "present", "gt_pixels", "pred_pixels", "tp", "fp", "fn", "tn", "iou",
    "precision", "recall", "fpr", "fnr", "fp_union", "fn_union", "eligible_pairs",
    "vanished_pairs", "vanished_rate",
)
IMAGE_COLUMNS = (
    "id", "missing", "labelled_pixels", "correct_pixels", "pixel_accuracy", "miou",
    "eligible_classes", "vanished",
)


def _csv_text(rows: list[dict], columns) -> str:
    """CSV of ``rows`` (None as an empty cell, lists joined with ``;``)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(key)) for key in columns])
    return buffer.getvalue()


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ";".join(str(v) for v in value)
    return value


def _write_csvs(directory: Path, report: dict, confusion: np.ndarray,
                     comparison: dict | None = None) -> list[Path]:
    """Write ``classes.csv``, ``images.csv``, ``confusion.csv`` and ``confusion.png``.

    With ``comparison`` (``compare_report``), the per-class and per-image CSVs gain the
    COMPARE columns and the deltas. Returns the written paths.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    classes, class_cols = report["per_class"], list(CLASS_COLUMNS)
    images, image_cols = report["per_image"], list(IMAGE_COLUMNS)
    if comparison is not None:
        classes = [{**row, **extra} for row, extra in zip(classes, comparison["per_class"])]
        class_cols += ["iou_compare", "delta_iou", "vanished_pairs_compare", "delta_vanished_pairs", "rescued_pairs",
                       "lost_pairs"]
        extra = {row["id"]: row for row in comparison["per_image"]}
        images = [{**row, **extra.get(row["id"], {})} for row in images]
        image_cols += ["miou_compare", "delta_miou"]
    names = [row["name"] for row in report["per_class"]]
    matrix = [{"gt": name, **dict(zip(names + ["(not a class)"], map(int, counts)))}
              for name, counts in zip(names, confusion)]
    written = []
    for name, rows, cols in (
        ("classes.csv", classes, class_cols),
        ("images.csv", images, image_cols),
        ("confusion.csv", matrix, ["gt"] + names + ["(not a class)"]),
    ):
        path = directory / name
        write_bytes_atomic(path, _csv_text(rows, cols).encode("utf-8"))
        written.append(path)
    path = directory / "confusion.png"
    write_bytes_atomic(path, encode_png(render_confusion(confusion, names)))
    written.append(path)
    return written
