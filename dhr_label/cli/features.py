"""``dhr-label features``: USS feature maps from the images, into a feats file."""
from __future__ import annotations

import enum
import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..features.backbones import BACKBONES
from ..runtime.features import Request, run_features
from .app import EXIT_USAGE, app, err_console, fail, guarded, progress_bar
from .pack import StoredDtype
from .refine import Device

Backbone = enum.Enum("Backbone", {name: name for name in BACKBONES}, type=str)


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise fail(f"{option} takes numbers separated by commas, e.g. 2,1,1.5,0.5; got {text!r}", EXIT_USAGE) from None
    if not values or any(not 0 < v <= 8 for v in values):
        raise fail(f"{option}: each scale must lie in (0, 8], got {text!r}", EXIT_USAGE)
    return values


@app.command("features")
@guarded
def features_command(
    out: Annotated[Path, typer.Option("--out", help="feats.h5 to create or add uss to (a file with WSS layers keeps them; a cams file becomes a combined one).", dir_okay=False)],
    cams: Annotated[Optional[Path], typer.Option("--cams", help="cams.h5: the ids, and the images from its image datasets unless --images.", dir_okay=False)] = None,
    images: Annotated[Optional[Path], typer.Option("--images", help="Directory of <id>.jpg|.jpeg|.png images (the ids too, without --cams).", file_okay=False)] = None,
    backbone: Annotated[Backbone, typer.Option("--backbone", help="efficientnet-lite0: ImageNet, offline (the 'features' extra); dino-*, dinov2-*: DINO ViTs (weights: --weights, the torch.hub cache or a download); stego: a STEGO head (--head) on DINO ViT-B/8; cause: a CAUSE head (--head) on DINOv2 ViT-B/14.")] = Backbone("efficientnet-lite0"),
    weights: Annotated[Optional[Path], typer.Option("--weights", help="The backbone's weight file (a state dict) instead of the package's / the hub's.", dir_okay=False)] = None,
    head: Annotated[Optional[Path], typer.Option("--head", help="The head's checkpoint: --backbone stego, the DHR release's STEGO_<data>.pt or a STEGO .ckpt; --backbone cause, the release's CAUSE_<data>.pt.", dir_okay=False)] = None,
    layers: Annotated[Optional[str], typer.Option("--layers", help="Feature taps, comma-separated: EfficientNet s4,s8,s16,s32,head (the first sets the grid); ViT block numbers 1..depth, -1 or last [default: s8,s16; last].")] = None,
    scales: Annotated[Optional[str], typer.Option("--scales", help="Image scales averaged, comma-separated; the first sets the output grid [default: 1 for efficientnet-lite0; 2,1,1.5,0.5 for the ViTs (DINO, DINOv2, STEGO, CAUSE), the DHR release's].")] = None,
    flip: Annotated[Optional[bool], typer.Option("--flip/--no-flip", help="Average each scale with its horizontal mirror [default: off for efficientnet-lite0, on for the ViTs (DINO, DINOv2, STEGO, CAUSE)].", show_default=False)] = None,
    window: Annotated[int, typer.Option("--window", min=0, help="Sliding windows of this many pixels, half a window apart, after resizing the short side to it (the DHR release's sliding mode); 0: whole images.")] = 0,
    pca: Annotated[Optional[int], typer.Option("--pca", min=0, help="Project to N dimensions with a PCA of the standardised channels fitted on --pca-sample images (no labels); saved in the file; 0: off [default: 64 for efficientnet-lite0, off for the ViTs (DINO, DINOv2, STEGO, CAUSE)].", show_default=False)] = None,
    pca_sample: Annotated[int, typer.Option("--pca-sample", min=1, help="Images the PCA is fitted on: evenly spaced over the sorted ids of the input (the same for every --limit and rerun).")] = 64,
    pca_from: Annotated[Optional[Path], typer.Option("--pca-from", help="Reuse the PCA saved in another feats file (e.g. the train split's) instead of fitting one.", dir_okay=False)] = None,
    l2: Annotated[bool, typer.Option("--l2/--no-l2", help="L2-normalise every feature cell (after the PCA).")] = True,
    dtype: Annotated[StoredDtype, typer.Option("--dtype", help="Stored precision.")] = StoredDtype.float16,
    device: Annotated[Device, typer.Option("--device", help="cpu, cuda, or auto (cuda when torch sees a GPU).")] = Device.cpu,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images of one size run together (one at a time after the device runs out of memory).")] = 4,
    threads: Annotated[Optional[int], typer.Option("--threads", "-j", min=1, help="CPU threads of torch [default: all cores].")] = None,
    ids: Annotated[Optional[Path], typer.Option("--ids", help="Only the ids listed in this file (one a line).", exists=True, dir_okay=False)] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Only the first N ids (after --ids).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Recompute the uss of images made with other settings (or elsewhere); each group's other datasets are kept.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Stop at the first image that fails.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the run summary as one JSON document on stdout.")] = False,
) -> None:
    """Compute unsupervised (USS) feature maps from the images and write them as /<id>/uss into a
    feats file (docs/format.md), beside the WSS layers it may already hold.

    The default is offline: the ImageNet EfficientNet-Lite0 of `pip install 'dhr-label[features]'`,
    stride-8 and stride-16 features, PCA to 64 dimensions, L2-normalised per cell. A rerun skips the
    images already made with the same settings; other settings are refused unless --overwrite.
    Exit 0 when every image is done or kept, 1 when any failed, 130 when interrupted.
    """
    if pca_from is not None and pca is not None:
        raise fail("--pca-from reuses a saved projection (its dimension included): leave out --pca", EXIT_USAGE)
    if head is not None and backbone.value not in ("stego", "cause"):
        raise fail("--head is a STEGO or CAUSE checkpoint: it needs --backbone stego or cause", EXIT_USAGE)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    request = Request(
        out=out, cams=cams, images=images, backbone=backbone.value,
        layers=tuple(v.strip() for v in layers.split(",") if v.strip()) if layers else None,
        scales=_floats(scales, "--scales"), flip=flip, window=window, pca=pca, pca_sample=pca_sample, pca_from=pca_from,
        l2=l2, weights=weights, head=head, dtype=dtype.value, device=device.value, batch_size=batch_size,
        ids_file=ids, limit=limit, overwrite=overwrite, strict=strict,
    )
    with progress_bar("features", None) as advance:
        outcome = run_features(request, on_phase=lambda name, n: advance.phase(f"features: {name}", n), on_image=advance)
    _summary(outcome, request, json_out)
    raise typer.Exit(outcome.exit_code)


def _summary(outcome, request: Request, json_out: bool) -> None:
    """The end-of-run table (stderr), and with --json one document (stdout)."""
    counts, seconds = outcome.counts, outcome.seconds
    computed = counts["done"]
    per_image = seconds.get("images", 0.0) / computed if computed else None
    if json_out:
        print(json.dumps({
            "out": str(request.out), "counts": counts, "settings_id": outcome.settings_id, "settings": outcome.settings,
            "pca": outcome.pca, "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "seconds_per_image": None if per_image is None else round(per_image, 4), "kept_other_settings": outcome.kept_other,
            "interrupted": outcome.interrupted, "failures": outcome.failures, "notes": outcome.notes,
        }))
    title = "dhr-label features" + (f" (interrupted by {outcome.interrupted})" if outcome.interrupted else "")
    table = Table(title=escape(title), show_header=False, title_justify="left")
    table.add_row("done", str(counts["done"]))
    table.add_row("kept (made earlier with these settings)", str(counts["skipped"]))
    table.add_row("failed", f"[red]{counts['failed']}[/]" if counts["failed"] else "0")
    if counts["not_run"]:
        table.add_row("not run", str(counts["not_run"]))
    if outcome.kept_other:
        table.add_row("outside this run, made with other settings", str(outcome.kept_other))
    settings = outcome.settings
    table.add_row("backbone", escape(f"{settings['backbone']} {','.join(settings['layers'])}, scales "
                                     f"{','.join(f'{s:g}' for s in settings['scales'])}" + (", flip" if settings["flip"] else "")))
    if outcome.pca is not None:
        how = f"fitted on {outcome.pca['images']} images in {seconds['pca']:.1f} s" if "pca" in seconds else "reused"
        table.add_row("PCA", f"{outcome.pca['dims'][1]} -> {outcome.pca['dims'][0]} dims, {how}, "
                             f"{100 * outcome.pca['explained']:.1f} % of the variance")
    table.add_row("time", f"{sum(seconds.values()):.1f} s" + (f" ({per_image:.3f} s per image)" if per_image else ""))
    table.add_row("settings", outcome.settings_id)
    table.add_row("out", escape(os.fspath(request.out)))
    err_console.print(table)
    if outcome.failures:
        err_console.print(f"{len(outcome.failures)} image(s) failed; the first ones:")
        for failure in outcome.failures[:10]:
            err_console.print(f"  {failure['id']}: {failure['source']}: {failure['problem']}", markup=False, soft_wrap=True)
