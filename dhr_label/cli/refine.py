"""``dhr-label refine``: DHR pseudo-masks for every image of a cams.h5 / feats.h5 pair."""
from __future__ import annotations

import contextlib
import enum
import json
import time
from functools import partial
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..errors import DHRLabelError, FileLevelError
from ..io.contract import CamsFile, FeatsFile
from ..io.ids import read_ids
from ..io.manifest import MANIFEST_FORMAT, describe_file, environment, manifest_path, write_manifest
from ..params import CapMode, CRFParams, DHRParams, Marginal, OTParams, Steps
from ..presets import check_agreement, preset_from_classes, resolve_preset
from ..runtime.parallel import cluster_threads, dask_client, default_workers
from ..runtime.outdir import InterruptWatch, finished_unreported, output_lock, prepare_output
from ..runtime.refine_run import DONE, FAILED, RefineJob, run_images
from ..runtime.selection import Shard, select_ids
from .app import DEFAULT_MASKS_DIR, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, app, err_console, fail, guarded

_D = DHRParams()  # only to show the defaults in --help; the values come from DHRParams itself


class Device(str, enum.Enum):
    """Where the non-CRF work runs."""

    cpu = "cpu"  # numpy, in the workers, image by image
    cuda = "cuda"  # torch batches on the GPU while CPU workers run the CRFs
    auto = "auto"  # cuda when torch sees a GPU, else cpu


class Backend(str, enum.Enum):
    """The joblib backend that runs the workers."""

    loky = "loky"  # processes on this machine
    dask = "dask"  # the workers of a Dask distributed cluster (--scheduler)


def resolve_device(device: Device) -> str:
    """``cpu`` or ``cuda``; ``auto`` is cuda when torch sees a GPU (torch is imported only then)."""
    if device is Device.cpu:
        return "cpu"
    import torch

    available = torch.cuda.is_available()
    if device is Device.auto:
        return "cuda" if available else "cpu"
    if not available:
        raise DHRLabelError("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False); use --device auto or cpu")
    return "cuda"


@contextlib.contextmanager
def engine(backend: Backend, scheduler: str | None, workers: int | None, device: str = "cpu"):
    """``(run, n_workers)`` for this run: ``run(job, ids)`` yields every image's result.

    A Dask client stays connected for the block; its cluster's threads are the worker count.
    """
    if backend is Backend.dask:
        with dask_client(scheduler) as client:
            n_workers = cluster_threads(client)
            yield partial(run_images, workers=n_workers, backend="dask", client=client), n_workers
        return
    n_workers = workers or default_workers()
    if device == "cuda":
        from ..runtime.gpu_run import run_images_batched

        yield partial(run_images_batched, workers=n_workers, device="cuda"), n_workers
        return
    yield partial(run_images, workers=n_workers), n_workers


def build_params(
    *,
    row: int,
    ot: Optional[bool],
    crf: Optional[bool],
    uss: Optional[bool],
    wss: Optional[bool],
    overrides: dict,
) -> DHRParams:
    """A :class:`DHRParams` from the ablation switches and the options the user set.

    ``overrides`` maps dotted names (``ot.eps``, ``crf.iterations``, ``rho``...) to values;
    None means "not given": the dataclass default applies.
    """
    steps = Steps.row(row)
    switches = {"ot": ot, "crf": crf, "uss": uss, "wss": wss}
    if any(v is not None for v in switches.values()):
        if row == 1:
            raise DHRLabelError("--row 1 outputs the base masks: the step switches do not apply")
        steps = Steps(init=True, **{k: (getattr(steps, k) if v is None else v) for k, v in switches.items()})
    groups: dict[str, dict] = {"ot": {}, "crf": {}, "": {}}
    for name, value in overrides.items():
        if value is None:
            continue
        head, _, tail = name.rpartition(".")
        groups[head][tail] = value
    try:
        return DHRParams(
            ot=OTParams(**groups["ot"]), crf=CRFParams(**groups["crf"]), steps=steps, **groups[""]
        )
    except ValueError as exc:
        raise DHRLabelError(f"invalid parameters: {exc}") from None


@app.command("refine")
@guarded
def refine_command(
    cams: Annotated[Path, typer.Option("--cams", help="cams.h5: CAMs, tags, optional base masks and images.", dir_okay=False)],
    feats: Annotated[Optional[Path], typer.Option("--feats", help="feats.h5: USS and WSS features (may be the cams file itself).", dir_okay=False)] = None,
    out: Annotated[Path, typer.Option("--out", help="Output directory for <id>.png masks and the manifest.", file_okay=False)] = DEFAULT_MASKS_DIR,
    images: Annotated[Optional[Path], typer.Option("--images", help="Directory of <id>.jpg|.png images (wins over the file's).", exists=True, file_okay=False)] = None,
    base: Annotated[Optional[Path], typer.Option("--base", help="Directory of <id>.png base masks (wins over the file's).", exists=True, file_okay=False)] = None,
    classes: Annotated[Optional[str], typer.Option("--classes", help="Dataset preset (voc, coco, context, context59, ade, stuff, camvid) or a class-list file; checked against the file's classes. Default: the file's.")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", "-j", min=1, help="Worker processes (default: all cores; a Dask cluster has its own).")] = None,
    device: Annotated[Device, typer.Option("--device", help="Where the non-CRF work runs: cpu (numpy, in the workers), cuda (torch batches on the GPU while CPU workers run the CRFs; same masks), auto (cuda if torch sees a GPU, else cpu).")] = Device.cpu,
    backend: Annotated[Backend, typer.Option("--backend", help="Worker engine: loky (processes on this machine) or dask (a Dask distributed cluster, with --scheduler).")] = Backend.loky,
    scheduler: Annotated[Optional[str], typer.Option("--scheduler", help="Address of the Dask scheduler for --backend dask, e.g. tcp://10.0.0.5:8786.")] = None,
    ids: Annotated[Optional[Path], typer.Option("--ids", help="Only the ids listed in this file (one a line).", exists=True, dir_okay=False)] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Only the first N ids (after --ids and --shard).")] = None,
    shard: Annotated[Optional[str], typer.Option("--shard", help="Run shard I of N (I/N), a deterministic split of the ids for cluster arrays.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Recompute masks that already exist (default: skip them).")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Stop at the first image that fails.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the run summary as one JSON document on stdout.")] = False,
    row: Annotated[int, typer.Option("--row", min=1, max=7, help="Ablation row of the paper's Table 6: 1 base, 2 OT, 3 CRF, 4 OT+CRF (Step 1), 5 +USS, 6 +WSS, 7 full DHR.")] = 7,
    ot: Annotated[Optional[bool], typer.Option("--ot/--no-ot", help="Step 1 OT re-weighting of the CAMs (overrides --row).", show_default=False)] = None,
    crf: Annotated[Optional[bool], typer.Option("--crf/--no-crf", help="Step 1 DenseCRF of the seed (overrides --row).", show_default=False)] = None,
    uss: Annotated[Optional[bool], typer.Option("--uss/--no-uss", help="USS rebalancing, Step 2 (overrides --row).", show_default=False)] = None,
    wss: Annotated[Optional[bool], typer.Option("--wss/--no-wss", help="WSS rebalancing, Step 3 (overrides --row).", show_default=False)] = None,
    eps: Annotated[Optional[float], typer.Option("--eps", help=f"Entropic regularisation of OT [default: {_D.ot.eps}].", show_default=False)] = None,
    ot_tol: Annotated[Optional[float], typer.Option("--ot-tol", help=f"Sinkhorn tolerance, L1 marginal error [default: {_D.ot.tol}].", show_default=False)] = None,
    ot_max_iter: Annotated[Optional[int], typer.Option("--ot-max-iter", help=f"Sinkhorn iteration cap [default: {_D.ot.max_iter}].", show_default=False)] = None,
    gamma: Annotated[Optional[float], typer.Option("--gamma", help=f"Background score exponent, (1 - max A)^gamma [default: {_D.gamma}].", show_default=False)] = None,
    rho: Annotated[Optional[float], typer.Option("--rho", help=f"Integration: a tag is lost when base keeps < rho of its seed [default: {_D.rho}].", show_default=False)] = None,
    tau: Annotated[Optional[float], typer.Option("--tau", help=f"WSS grouping threshold on USS centroid correlation; 1 = off [default: {_D.tau}].", show_default=False)] = None,
    cap: Annotated[Optional[CapMode], typer.Option("--cap", help=f"Class-level average pooling: soft (fractions) or majority (released code) [default: {_D.cap.value}].", show_default=False)] = None,
    marginal: Annotated[Optional[Marginal], typer.Option("--marginal", help=f"Class marginal of the Step 2/3 OT [default: {_D.marginal_rebalance.value}].", show_default=False)] = None,
    marginal_init: Annotated[Optional[Marginal], typer.Option("--marginal-init", help=f"Class marginal of the Step 1 OT [default: {_D.marginal_init.value}].", show_default=False)] = None,
    marginal_floor: Annotated[Optional[float], typer.Option("--marginal-floor", help=f"Floor of the area marginal [default: {_D.marginal_floor}].", show_default=False)] = None,
    marginal_kl: Annotated[Optional[float], typer.Option("--marginal-kl", help=f"KL weight of the unbalanced marginal [default: {_D.marginal_kl}].", show_default=False)] = None,
    crf_iters: Annotated[Optional[int], typer.Option("--crf-iters", help=f"DenseCRF mean-field iterations [default: {_D.crf.iterations}].", show_default=False)] = None,
    crf_gauss_sxy: Annotated[Optional[float], typer.Option("--crf-gauss-sxy", help=f"Gaussian kernel sxy [default: {_D.crf.gauss_sxy}].", show_default=False)] = None,
    crf_gauss_compat: Annotated[Optional[float], typer.Option("--crf-gauss-compat", help=f"Gaussian kernel weight [default: {_D.crf.gauss_compat}].", show_default=False)] = None,
    crf_bi_sxy: Annotated[Optional[float], typer.Option("--crf-bi-sxy", help=f"Bilateral kernel sxy [default: {_D.crf.bilateral_sxy}].", show_default=False)] = None,
    crf_bi_srgb: Annotated[Optional[float], typer.Option("--crf-bi-srgb", help=f"Bilateral kernel srgb [default: {_D.crf.bilateral_srgb}].", show_default=False)] = None,
    crf_bi_compat: Annotated[Optional[float], typer.Option("--crf-bi-compat", help=f"Bilateral kernel weight [default: {_D.crf.bilateral_compat}].", show_default=False)] = None,
    guard: Annotated[Optional[float], typer.Option("--guard", help=f"Ours, not the paper's: after Step 3, give a class back its M_init region when it kept less than this fraction of it; fewer vanished classes for a little mIoU (see README); 0 = off [default: {_D.guard}].", show_default=False)] = None,
    guard_max_share: Annotated[Optional[float], typer.Option("--guard-max-share", help=f"Guard only classes covering less than this share of M_init [default: {_D.guard_max_share}].", show_default=False)] = None,
) -> None:
    """Refine the pseudo-masks of every image with DHR and write <out>/<id>.png.

    Runs Step 1 (OT seed, DenseCRF, recovery of vanished classes into the base mask), Step 2
    (USS rebalancing) and Step 3 (WSS rebalancing, final OT and DenseCRF). Existing masks are
    skipped unless --overwrite, so a killed run resumes where it stopped. Exit 0 when every
    image is done or skipped, 1 when any failed, 130 when interrupted.
    """
    params = build_params(
        row=row, ot=ot, crf=crf, uss=uss, wss=wss,
        overrides={
            "ot.eps": eps, "ot.tol": ot_tol, "ot.max_iter": ot_max_iter, "gamma": gamma, "rho": rho,
            "tau": tau, "cap": cap, "marginal_rebalance": marginal, "marginal_init": marginal_init,
            "marginal_floor": marginal_floor, "marginal_kl": marginal_kl, "crf.iterations": crf_iters,
            "crf.gauss_sxy": crf_gauss_sxy, "crf.gauss_compat": crf_gauss_compat,
            "crf.bilateral_sxy": crf_bi_sxy, "crf.bilateral_srgb": crf_bi_srgb,
            "crf.bilateral_compat": crf_bi_compat,
            "guard": guard, "guard_max_share": guard_max_share,
        },
    )
    try:
        the_shard = Shard.parse(shard) if shard else Shard()
    except ValueError as exc:
        raise fail(str(exc), code=2) from None
    needs_feats = params.steps.init and params.steps.rebalance
    if needs_feats and feats is None:
        raise fail(
            f"--feats is required for ablation row {row} (Steps 2/3 use USS/WSS features); "
            "use --row 4 for Step 1 alone", code=2
        )
    if backend is Backend.dask:
        if scheduler is None:
            raise fail("--backend dask needs --scheduler ADDRESS (e.g. tcp://host:8786)", code=2)
        if workers is not None:
            raise fail("--workers applies to --backend loky; a Dask cluster runs as many tasks as its workers have threads", code=2)
    elif scheduler is not None:
        raise fail("--scheduler is the address of a Dask scheduler: it needs --backend dask", code=2)
    if backend is Backend.dask and device is Device.cuda:
        raise fail("--device cuda runs its CRF workers on this machine: use it with --backend loky", code=2)
    the_device = "cpu" if backend is Backend.dask else resolve_device(device)
    combined = feats is not None and cams.resolve() == feats.resolve()

    with CamsFile.open(cams, combined=combined) as cams_file:
        preset = resolve_preset(classes) if classes else preset_from_classes(cams_file.classes, cams_file.background)
        check_agreement(preset, cams_file.classes, cams_file.background, str(cams))
        available = cams_file.ids()
    if needs_feats:
        # A file-level fault of feats.h5 stops the run here, before any work; an id missing
        # from it fails that image alone, in its worker, like any other missing dataset.
        FeatsFile.open(feats, combined=combined).close()
    wanted = read_ids(ids) if ids else None
    selected, unknown = select_ids(available, wanted=wanted, shard=the_shard, limit=limit)
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise FileLevelError(f"{len(unknown)} id(s) of {ids} are not in {cams}: {shown}")

    prepare_output(out)
    job = RefineJob(
        cams=cams, feats=feats if needs_feats else None, out=out, params=params,
        background=preset.background, palette=preset.palette, images_dir=images, base_dir=base,
    )
    with output_lock(out, the_shard, token=job.token), engine(backend, scheduler, workers, the_device) as (run, n_workers):
        todo = selected if overwrite else [i for i in selected if not (out / f"{i}.png").exists()]
        skipped = len(selected) - len(todo)
        failures: list[dict] = []
        counts = {"selected": len(selected), "done": 0, "skipped": skipped, "failed": 0}
        notes: dict[str, list[str]] = {}
        step_seconds: dict[str, float] = {}
        interrupted = False
        fatal: str | None = None  # why the run stopped before its end (full disk, dead pool)
        reported: set[str] = set()
        started = time.time()
        t0 = time.perf_counter()

        def record(result) -> None:
            reported.add(result.image_id)
            if result.status == DONE:
                counts["done"] += 1
                for key, value in result.timings.items():
                    step_seconds[key] = step_seconds.get(key, 0.0) + value
            else:
                counts["failed"] += 1
                failures.append({"id": result.image_id, "reason": result.reason})
                # Escaped: an id or a path may hold [brackets] that Rich would read as markup.
                err_console.print(f"[red]failed[/] {escape(result.image_id)}: {escape(result.reason)}", markup=True, soft_wrap=True, highlight=False)
            if result.notes:
                notes[result.image_id] = result.notes

        progress = Progress(
            TextColumn("refine"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=False,
            disable=not err_console.is_terminal,
        )
        try:
            with progress, InterruptWatch() as watch:
                bar = progress.add_task("refine", total=len(todo), rate="")
                results = run(job, todo)
                try:
                    for result in results:
                        record(result)
                        elapsed = time.perf_counter() - t0
                        progress.update(bar, advance=1, rate=f"{(counts['done'] + counts['failed']) / max(elapsed, 1e-9):.2f} img/s")
                        if watch.requested:  # a Ctrl-C Python swallowed in a callback
                            raise KeyboardInterrupt
                        if result.fatal:
                            fatal = result.reason
                            break
                        if strict and result.status == FAILED:
                            break
                finally:
                    results.close()  # stops the workers before output_lock removes temporaries
        except KeyboardInterrupt:
            interrupted = True
        except Exception as exc:  # noqa: BLE001 - a worker died (out of memory, a crash): report, keep the counts
            fatal = f"the run stopped: {type(exc).__name__}: {exc}"
        finally:
            seconds = time.perf_counter() - t0
        # Masks written by workers stopped before they could report (atomic: they are complete).
        late = finished_unreported(out, [i for i in todo if i not in reported], since=started if overwrite else None)
        counts["done"] += len(late)
        counts["not_run"] = counts["selected"] - counts["done"] - counts["skipped"] - counts["failed"]
        manifest = {
            "format": MANIFEST_FORMAT,
            **environment(),
            "command": "refine",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "seconds": round(seconds, 3),
            "interrupted": interrupted,
            "strict_stop": bool(strict and counts["failed"]),
            "error": fatal,
            "preset": {"name": preset.name, "classes": list(preset.classes), "background": preset.background},
            "parameters": params.to_dict(),
            "inputs": {
                "cams": describe_file(cams), "feats": describe_file(feats if needs_feats else None),
                "images": describe_file(images), "base": describe_file(base), "ids": describe_file(ids),
            },
            "selection": {"limit": limit, "overwrite": overwrite, "workers": n_workers},
            "engine": {"device": the_device, "backend": backend.value, "scheduler": scheduler},
            "shard": {"index": the_shard.index, "count": the_shard.count},
            "counts": counts,
            "timing": {"per_step_seconds": {k: round(v, 4) for k, v in step_seconds.items()}},
            "failures": sorted(failures, key=lambda f: f["id"]),
            "notes": dict(sorted(notes.items())),
        }
        target = manifest_path(out, the_shard.tag)
        try:
            write_manifest(target, manifest)
        except OSError as exc:  # the disk that stopped the masks stops the manifest too
            problem = f"cannot write the manifest {target}: {exc.strerror or exc}"
            fatal = f"{fatal}; {problem}" if fatal else problem
            target = None

    _summary(counts, seconds, out, target, failures, interrupted, json_out, manifest)
    if fatal:
        raise fail(fatal, code=EXIT_INTERRUPTED if interrupted else EXIT_FAILED)
    if interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)
    raise typer.Exit(EXIT_FAILED if counts["failed"] else EXIT_OK)


def _summary(counts, seconds, out, target, failures, interrupted, json_out, manifest) -> None:
    """The one-screen end-of-run summary (stderr), or the JSON document (stdout)."""
    processed = counts["done"] + counts["failed"]
    rate = processed / seconds if seconds > 0 else 0.0
    if json_out:
        summary = {
            "out": str(out), "manifest": str(target) if target else None, "counts": counts, "seconds": round(seconds, 3),
            "images_per_second": round(rate, 3), "interrupted": interrupted, "failures": manifest["failures"],
        }
        print(json.dumps(summary))
    table = Table(title="dhr-label refine" + (" (interrupted)" if interrupted else ""), show_header=False, title_justify="left")
    table.add_row("done", str(counts["done"]))
    table.add_row("skipped (mask exists)", str(counts["skipped"]))
    table.add_row("failed", f"[red]{counts['failed']}[/]" if counts["failed"] else "0")
    if counts["not_run"]:
        table.add_row("not run", str(counts["not_run"]))
    table.add_row("time", f"{seconds:.1f} s")
    table.add_row("throughput", f"{rate:.2f} images/s")
    if manifest["notes"]:
        table.add_row("with notes (see manifest)", str(len(manifest["notes"])))
    table.add_row("masks", escape(str(out)))
    table.add_row("manifest", escape(str(target)) if target else "[red]not written[/]")
    err_console.print(table)
    if failures:
        err_console.print(f"{len(failures)} image(s) failed; the first ones:")
        for failure in failures[:10]:
            err_console.print(f"  {failure['id']}: {failure['reason']}", markup=False, soft_wrap=True)
