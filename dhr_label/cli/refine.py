"""``dhr-label refine``: DHR pseudo-masks for every image of a cams.h5 / feats.h5 pair.

Parse the options into a :class:`~dhr_label.runtime.refine.RefineRequest`, run it, report.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import DHRLabelError
from ..params import CapMode, CRFBackend, CRFKernels, CRFParams, DHRParams, Marginal, OTParams, Steps
from ..presets import resolve_preset
from ..runtime.outcomes import FAILED
from ..runtime.refine import RefineReport, RefineRequest, run_refine
from ..runtime.refine.batches import BATCH_PIXELS
from ..runtime.refine.run import CPU_CRF_BACKEND
from ..runtime.selection import Shard
from ..runtime.signals import stop_name
from .app import DEFAULT_MASKS_DIR, app, err_console, fail, guarded, progress_bar, usage_error

_D = DHRParams()  # only to show the defaults in --help; the values come from DHRParams itself


class Device(str, enum.Enum):
    """Where DHR runs."""

    cpu = "cpu"  # image by image in worker processes
    cuda = "cuda"  # the whole image on the GPU, in batches
    auto = "auto"  # cuda when torch sees a GPU, else cpu


class Cluster(str, enum.Enum):
    """Where the images executor's workers run."""

    local = "local"  # processes on this machine (joblib's loky)
    dask = "dask"  # the workers of a Dask distributed cluster (--scheduler)


class LegacyBackend(str, enum.Enum):
    """``--backend``, the name of ``--cluster`` before 0.5 (joblib's word for it)."""

    loky = "loky"
    dask = "dask"


class CRFChoice(str, enum.Enum):
    auto = "auto"
    pydensecrf = "pydensecrf"
    torch = "torch"


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


def read_params_file(path: Path) -> DHRParams:
    """The parameters of a ``--params`` file (``dhr-label tune`` writes one): a JSON object
    with a ``parameters`` mapping (or the mapping itself), as ``DHRParams.to_dict`` writes."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise usage_error(f"cannot read {path} as JSON: {exc}", "--params") from None
    values = document.get("parameters", document) if isinstance(document, dict) else document
    try:
        return DHRParams.from_dict(values)
    except ValueError as exc:
        raise usage_error(f"{path}: {exc}", "--params") from None


def build_params(
    *, start: DHRParams | None, row: Optional[int], switches: dict, overrides: dict, crf_backend: CRFChoice, device: str,
    crf_kernels: CRFKernels = CRFKernels.auto,
) -> DHRParams:
    """A :class:`DHRParams` from ``start`` (the defaults, or a ``--params`` file), the ablation
    row and switches, and the options the user set (``overrides``: dotted names to values;
    None = not given). Explicit options win over the file; ``--crf-backend auto`` keeps the
    file's backend on the CPU, ``--crf-kernels auto`` the file's kernels. The torch backend's
    kernels are resolved for ``device`` (auto: triton on cuda when Triton imports, else eager).
    A value out of range is a usage error."""
    from_file, start = start is not None, start or DHRParams()
    steps = Steps.row(row) if row is not None else start.steps
    if any(v is not None for v in switches.values()):
        if not steps.init:
            raise usage_error("row 1 outputs the base masks: the step switches do not apply", "--row")
        steps = Steps(init=True, **{k: (getattr(steps, k) if v is None else v) for k, v in switches.items()})
    if crf_backend is not CRFChoice.auto:
        overrides["crf.backend"] = CRFBackend(crf_backend.value)
    elif device == "cuda":
        overrides["crf.backend"] = CRFBackend.torch
    elif not from_file:
        overrides["crf.backend"] = CPU_CRF_BACKEND
    groups: dict[str, dict] = {"ot": {}, "crf": {}, "": {}}
    for name, value in overrides.items():
        if value is not None:
            head, _, tail = name.rpartition(".")
            groups[head][tail] = value
    try:
        params = start.replace(
            ot=OTParams(**{**vars(start.ot), **groups["ot"]}), crf=CRFParams(**{**vars(start.crf), **groups["crf"]}),
            steps=steps, **groups[""],
        )
    except ValueError as exc:
        raise usage_error(f"invalid parameters: {exc}") from None
    if device == "cuda" and params.crf.backend is CRFBackend.pydensecrf:
        raise usage_error("pydensecrf runs on the CPU only: with --device cuda the CRF is the torch backend", "--crf-backend")
    kernels = crf_kernels if crf_kernels is not CRFKernels.auto else params.crf.kernels
    if params.crf.backend is not CRFBackend.torch:
        if crf_kernels is not CRFKernels.auto:
            raise usage_error(f"--crf-kernels {crf_kernels.value} applies to the torch CRF backend (--crf-backend torch)",
                              "--crf-kernels")
        return params
    from ..core.crf.fused import resolve_kernels  # imports torch: only for the torch backend

    try:
        kernels = resolve_kernels(kernels, device)
    except ValueError as exc:
        raise usage_error(str(exc), "--crf-kernels") from None
    return params.replace(crf=dataclasses.replace(params.crf, kernels=kernels))


# Long only by its signature: each Typer option is one declaration (the body is parse -> run ->
# report, ~40 lines).
@app.command("refine")
@guarded
def refine_command(
    cams: Annotated[Path, typer.Option("--cams", help="cams.h5: CAMs, tags, optional base masks and images.", dir_okay=False)],
    feats: Annotated[Optional[Path], typer.Option("--feats", help="feats.h5: USS and WSS features (may be the cams file itself).", dir_okay=False)] = None,
    out: Annotated[Path, typer.Option("--out", help="Output directory for <id>.png masks and the manifest.", file_okay=False)] = DEFAULT_MASKS_DIR,
    images: Annotated[Optional[Path], typer.Option("--images", help="Directory of <id>.jpg|.png images (wins over the file's).", exists=True, file_okay=False)] = None,
    base: Annotated[Optional[Path], typer.Option("--base", help="Directory of <id>.png base masks (wins over the file's).", exists=True, file_okay=False)] = None,
    classes: Annotated[Optional[str], typer.Option("--classes", help="Dataset preset (voc, coco, context, context59, ade, stuff, camvid) or a class-list file; checked against the file's classes. Default: the file's.")] = None,
    params_file: Annotated[Optional[Path], typer.Option("--params", help="Parameters from a JSON file (dhr-label tune's params.json); options given here win.", exists=True, dir_okay=False)] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", "-j", min=1, help="Worker processes: the CPU executor's, or the readers of --device cuda (default: all cores; a Dask cluster has its own).")] = None,
    device: Annotated[Device, typer.Option("--device", help="cpu: image by image in worker processes; cuda: the whole image on the GPU, in batches (torch CRF); auto: cuda if torch sees a GPU, else cpu.")] = Device.cpu,
    crf_backend: Annotated[CRFChoice, typer.Option("--crf-backend", help=f"DenseCRF implementation: pydensecrf (C++, CPU) or torch (ours, same model, CPU or GPU); auto: torch on cuda, {CPU_CRF_BACKEND.value} on cpu (the faster there, README).")] = CRFChoice.auto,
    crf_kernels: Annotated[CRFKernels, typer.Option("--crf-kernels", help="How the torch CRF computes (the same marginals bit for bit): eager (torch operations) or triton (fused Triton kernels; on the CPU only under TRITON_INTERPRET=1, for checks); auto: triton on cuda when Triton imports, else eager. Recorded in the manifest (docs/performance.md).")] = CRFKernels.auto,
    batch_pixels: Annotated[int, typer.Option("--batch-pixels", min=1, help="With --device cuda: pixels per batch (sum of H x W); halved on out-of-memory.")] = BATCH_PIXELS,
    cluster: Annotated[Cluster, typer.Option("--cluster", help="Where the CPU workers run: local (processes on this machine) or dask (the workers of a Dask distributed cluster, with --scheduler).")] = Cluster.local,
    scheduler: Annotated[Optional[str], typer.Option("--scheduler", help="Address of the Dask scheduler for --cluster dask, e.g. tcp://10.0.0.5:8786.")] = None,
    backend: Annotated[Optional[LegacyBackend], typer.Option("--backend", hidden=True, help="Before 0.5: --cluster (loky = local).")] = None,
    ids: Annotated[Optional[Path], typer.Option("--ids", help="Only the ids listed in this file (one a line).", exists=True, dir_okay=False)] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Only the first N ids (after --ids and --shard).")] = None,
    shard: Annotated[Optional[str], typer.Option("--shard", help="Run shard I of N (I/N), a deterministic split of the ids for cluster arrays.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Recompute every selected mask, also those that exist.")] = False,
    allow_mixed: Annotated[bool, typer.Option("--allow-mixed", help="Keep masks made with other settings in --out (default: refuse to mix them with this run's).")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Stop at the first image that fails.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the run summary as one JSON document on stdout.")] = False,
    row: Annotated[Optional[int], typer.Option("--row", min=1, max=7, help="Ablation row of the paper's Table 6: 1 base, 2 OT, 3 CRF, 4 OT+CRF (Step 1), 5 +USS, 6 +WSS, 7 full DHR [default: 7].", show_default=False)] = None,
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
    guard: Annotated[Optional[float], typer.Option("--guard", help=f"Ours, not the paper's: after Step 3, give a class back its M_init region (the part of it --guard-support admits) when it kept less than this fraction of it; 0 = off [default: {_D.guard}].", show_default=False)] = None,
    guard_max_share: Annotated[Optional[float], typer.Option("--guard-max-share", help=f"Guard only classes covering less than this share of M_init [default: {_D.guard_max_share}].", show_default=False)] = None,
    guard_support: Annotated[Optional[float], typer.Option("--guard-support", help=f"Give back only the pixels of the M_init region where the class's own heat map reaches this; 0 = the whole region [default: {_D.guard_support}].", show_default=False)] = None,
    prototype_weight: Annotated[Optional[float], typer.Option("--prototype-weight", help=f"Ours: blend dataset-level class prototypes into the Step 2/3 centroids with this weight (rows 5 and 7); they are pooled from the base masks of every image of the cams file before the run (no CRF) and saved in OUT, or read from --prototypes; 0 = the paper's per-image centroids (docs/algorithm.md) [default: {_D.prototype_weight}].", show_default=False)] = None,
    prototypes_file: Annotated[Optional[Path], typer.Option("--prototypes", metavar="<file>", help="Class prototypes to use instead of pooling them: the dhr-label-prototypes.npz of an earlier run (another shard, a train split).", exists=True, dir_okay=False)] = None,
    wss_heat_weight: Annotated[Optional[float], typer.Option("--wss-heat-weight", help=f"Ours: in full DHR, Step 2's heat maps become (1 - w) USS + w WSS maps; 0 = the paper (WSS maps only inside Step-3 groups) [default: {_D.wss_heat_weight}].", show_default=False)] = None,
    support_temperature: Annotated[Optional[float], typer.Option("--support-temperature", help=f"Ours: each class's Step 2/3 centroid pools M_init's cells weighted by the class's posterior over the image's classes, the softmax of the cells' USS cosines to the centroids over this temperature; 0 = M_init's cells alone, the paper (docs/algorithm.md) [default: {_D.support_temperature}].", show_default=False)] = None,
    support_prior: Annotated[Optional[float], typer.Option("--support-prior", help=f"Ours: with --support-temperature, added to M_init's cell fractions before the posterior, so that cells outside a class's M_init region count a little where they look like it [default: {_D.support_prior}].", show_default=False)] = None,
    size_passes: Annotated[Optional[int], typer.Option("--size-passes", help=f"Ours: Step 3's OT calls run again this many times with the class sizes (area marginal) of the previous answer instead of M_init's; 0 = M_init's, the paper [default: {_D.size_passes}].", show_default=False)] = None,
    colour_weight: Annotated[Optional[float], typer.Option("--colour-weight", help=f"Ours: the upsampled heat maps are mixed with this weight of a colour model of the classes pooled from the image itself before the final DenseCRF; 0 = the heat maps alone, the paper [default: {_D.colour_weight}].", show_default=False)] = None,
    ignore_below: Annotated[Optional[float], typer.Option("--ignore-below", help=f"Ours: label 255 (ignore) where the final DenseCRF's maximum marginal is below P (trainers skip 255); 0 = off [default: {_D.ignore_below}].", show_default=False)] = None,
) -> None:
    """Refine the pseudo-masks of every image with DHR and write <out>/<id>.png.

    Runs Step 1 (OT seed, DenseCRF, recovery of vanished classes into the base mask), Step 2
    (USS rebalancing) and Step 3 (WSS rebalancing, final OT and DenseCRF). Masks made with the
    same settings are kept, so a killed run resumes where it stopped; masks made with other
    settings are not mixed in unless --overwrite or --allow-mixed. Exit 0 when every image is
    done or kept, 1 when any failed, 130 on Ctrl-C, 143 on SIGTERM, 129 on SIGHUP.
    """
    try:
        preset = resolve_preset(classes) if classes else None
    except DHRLabelError as exc:
        raise usage_error(str(exc), "--classes") from None
    try:
        the_shard = Shard.parse(shard) if shard else Shard()
    except ValueError as exc:
        raise usage_error(str(exc), "--shard") from None
    if backend is not None:  # the option's name before 0.5
        err_console.print("warning: --backend is called --cluster since 0.5 (loky is local)", style="yellow")
        cluster = Cluster.dask if backend is LegacyBackend.dask else Cluster.local
    if cluster is Cluster.dask:
        if scheduler is None:
            raise usage_error("--cluster dask needs --scheduler ADDRESS (e.g. tcp://host:8786)", "--scheduler")
        if workers is not None:
            raise usage_error("--workers applies to --cluster local; a Dask cluster runs as many tasks as its workers have threads", "--workers")
        if device is Device.cuda:
            raise usage_error("--device cuda runs on this machine: use it with --cluster local", "--device")
    elif scheduler is not None:
        raise usage_error("--scheduler is the address of a Dask scheduler: it needs --cluster dask", "--scheduler")
    the_device = "cpu" if cluster is Cluster.dask else resolve_device(device)
    params = build_params(
        start=read_params_file(params_file) if params_file else None, row=row,
        switches={"ot": ot, "crf": crf, "uss": uss, "wss": wss}, crf_backend=crf_backend, device=the_device,
        crf_kernels=crf_kernels,
        overrides={
            "ot.eps": eps, "ot.tol": ot_tol, "ot.max_iter": ot_max_iter, "gamma": gamma, "rho": rho,
            "tau": tau, "cap": cap, "marginal_rebalance": marginal, "marginal_init": marginal_init,
            "marginal_floor": marginal_floor, "marginal_kl": marginal_kl, "crf.iterations": crf_iters,
            "crf.gauss_sxy": crf_gauss_sxy, "crf.gauss_compat": crf_gauss_compat,
            "crf.bilateral_sxy": crf_bi_sxy, "crf.bilateral_srgb": crf_bi_srgb,
            "crf.bilateral_compat": crf_bi_compat, "guard": guard, "guard_max_share": guard_max_share,
            "guard_support": guard_support,
            "ignore_below": ignore_below, "prototype_weight": prototype_weight, "wss_heat_weight": wss_heat_weight,
            "support_temperature": support_temperature, "support_prior": support_prior, "size_passes": size_passes,
            "colour_weight": colour_weight,
        },
    )
    if params.steps.needs_features and feats is None:
        raise usage_error("Steps 2/3 use USS/WSS features: give --feats, or use --row 4 for Step 1 alone", "--feats")
    request = RefineRequest(
        cams=cams, feats=feats, out=out, params=params, preset=preset, images=images, base=base, ids_file=ids,
        limit=limit, shard=the_shard, overwrite=overwrite, allow_mixed=allow_mixed, strict=strict, workers=workers,
        device=the_device, cluster=cluster.value, scheduler=scheduler, batch_pixels=batch_pixels,
        prototypes=prototypes_file, command=tuple(sys.argv[1:]),
    )
    with progress_bar("refine", None) as advance:

        def show(result) -> None:
            advance()
            if result.status == FAILED:  # escaped: an id or a path may hold [brackets]
                err_console.print(f"[red]failed[/] {escape(result.image_id)}: {escape(result.reason)}", markup=True, soft_wrap=True)

        report = run_refine(request, on_start=lambda todo, skipped: advance.total(todo), on_result=show)
    _summary(report, json_out)
    if report.error:
        raise fail(report.error, code=report.exit_code)
    raise typer.Exit(report.exit_code)


def _summary(report: RefineReport, json_out: bool) -> None:
    """The one-screen end-of-run summary (stderr), and with --json one document (stdout)."""
    counts, seconds = report.counts, report.seconds
    rate = (counts["done"] + counts["failed"]) / seconds if seconds > 0 else 0.0
    p = report.prototypes
    if p is not None and p.prototypes is not None:
        how = {"pooled": f"pooled from the base masks of {p.images} images{_not_pooled(p)} in {p.seconds:.1f} s",
               "reused": "read from this directory (pooled by an earlier run)", "file": "read from --prototypes"}[p.source]
        err_console.print(f"class prototypes: {how} -> {escape(str(p.file))}", highlight=False, soft_wrap=True)
    for warning in report.warnings:
        err_console.print(f"warning: {escape(warning)}", style="yellow", soft_wrap=True)
    if json_out:
        print(json.dumps({
            "out": str(report.out), "manifest": str(report.manifest) if report.manifest else None, "counts": counts,
            "seconds": round(seconds, 3), "images_per_second": round(rate, 3), "interrupted": report.interrupted is not None,
            "error": report.error, "failures": report.failures, "warnings": report.warnings,
        }))
    title = "dhr-label refine" + (f" (interrupted by {stop_name(report.interrupted)})" if report.interrupted is not None else "")
    table = Table(title=escape(title), show_header=False, title_justify="left")
    table.add_row("done", str(counts["done"]))
    other = counts["skipped_other_settings"]
    table.add_row("kept (made earlier with these settings)", str(counts["skipped"] - other))
    if other:
        table.add_row("kept (made with other settings: a mixed directory)", f"[yellow]{other}[/]")
    table.add_row("failed", f"[red]{counts['failed']}[/]" if counts["failed"] else "0")
    if counts["not_run"]:
        table.add_row("not run", str(counts["not_run"]))
    table.add_row("time", f"{seconds:.1f} s")
    table.add_row("throughput", f"{rate:.2f} images/s")
    if report.noted:
        table.add_row("with notes (see manifest)", str(report.noted))
    table.add_row("masks", escape(str(report.out)))
    table.add_row("manifest", escape(str(report.manifest)) if report.manifest else "[red]not written[/]")
    err_console.print(table)
    if report.failures:
        err_console.print(f"{len(report.failures)} image(s) failed; the first ones:")
        for failure in report.failures[:10]:
            err_console.print(f"  {failure['id']}: {failure['reason']}", markup=False, soft_wrap=True)


def _not_pooled(p) -> str:
    """`` (2 without a base mask; 1 whose base mask or features could not be read...)``, or nothing."""
    parts = [f"{p.without_base} without a base mask"] if p.without_base else []
    if p.unreadable:
        parts.append(f"{p.unreadable} whose base mask or features could not be read: refining it fails and says why")
    return f" ({'; '.join(parts)})" if parts else ""
