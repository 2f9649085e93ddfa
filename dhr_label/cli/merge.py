"""``dhr-label merge-manifests``: one manifest for the shards of a ``refine --shard I/N`` job."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import DHRLabelError
from ..io.manifest import MANIFEST_PREFIX, environment, manifest_path, merge_manifests, read_manifest, write_manifest
from .app import EXIT_FAILED, EXIT_OK, app, err_console, guarded, out_console, print_json

SHARD_FILE = re.compile(re.escape(MANIFEST_PREFIX) + r"\.shard-(\d+)-of-(\d+)\.json$")
#: Per-run fields a merged manifest keeps per shard (each shard ran on its own host and time).
PER_RUN = ("host", "pid", "started", "seconds", "interrupted", "strict_stop", "error", "selection", "engine")
SHOWN_FAILURES = 10


def shard_files(directory: Path) -> list[Path]:
    """Every ``dhr-label-manifest.shard-I-of-N.json`` in ``directory``, by N then I."""
    found = []
    for path in directory.iterdir():
        name = SHARD_FILE.match(path.name)
        if name:
            found.append((int(name[2]), int(name[1]), path))
    return [path for _, _, path in sorted(found)]


def problems_of(merged: dict, manifests: list[dict]) -> list[str]:
    """Why the merged run is not complete and clean (empty when it is)."""
    problems = []
    counts = {s.get("count") for s in merged["shards"]}
    if len(counts) > 1:
        problems.append(f"the shards come from different splits (N = {sorted(counts)}): not one job")
    else:
        total = counts.pop()
        present = {s.get("index") for s in merged["shards"]}
        missing = sorted(set(range(1, total + 1)) - present)
        if missing:
            problems.append(f"{len(missing)} of {total} shard manifest(s) missing: shard(s) {', '.join(map(str, missing))}")
    for manifest in manifests:
        shard = manifest.get("shard") or {}
        name = f"shard {shard.get('index')}/{shard.get('count')}"
        not_run = int((manifest.get("counts") or {}).get("not_run", 0))
        if manifest.get("interrupted"):
            problems.append(f"{name} was interrupted ({not_run} image(s) not run)")
        elif manifest.get("error"):
            problems.append(f"{name} stopped: {manifest['error']}")
        elif not_run:
            problems.append(f"{name} left {not_run} image(s) not run")
    failed = int(merged["counts"].get("failed", 0))
    if failed:
        problems.append(f"{failed} image(s) failed")
    return problems


@app.command("merge-manifests")
@guarded
def merge_manifests_command(
    out_dir: Annotated[Path, typer.Argument(help="The output directory the shards wrote into (refine --out).", metavar="OUT_DIR", exists=True, file_okay=False)],
    json_out: Annotated[bool, typer.Option("--json", help="Print the merged summary as one JSON document on stdout.")] = False,
) -> None:
    """Merge the manifests of the shards of one `refine --shard I/N` job into dhr-label-manifest.json.

    Reads every dhr-label-manifest.shard-I-of-N.json in OUT_DIR and writes the merged manifest
    (counts summed, failures and notes gathered, one entry per shard run). Exit 0 when every
    shard is present and complete and no image failed; 1 otherwise (the merged manifest is
    still written, and says what is missing).
    """
    merged, problems, target = _merge(out_dir)
    _summary(merged, problems, target, json_out)
    for problem in problems:
        err_console.print(f"[bold red]error:[/] {escape(problem)}", markup=True, soft_wrap=True)
    raise typer.Exit(EXIT_FAILED if problems else EXIT_OK)


def _merge(out_dir: Path) -> tuple[dict, list[str], Path]:
    files = shard_files(out_dir)
    if not files:
        raise DHRLabelError(f"no {MANIFEST_PREFIX}.shard-I-of-N.json in {out_dir}: nothing to merge")
    manifests = []
    for path in files:
        try:
            manifest = read_manifest(path)
        except (OSError, ValueError) as exc:
            raise DHRLabelError(f"{path}: cannot read this manifest: {exc}") from None
        name = SHARD_FILE.match(path.name)
        expected = {"index": int(name[1]), "count": int(name[2])}
        if manifest.get("shard") != expected:
            raise DHRLabelError(f"{path}: the file name says shard {expected}, its content says {manifest.get('shard')}")
        manifests.append(manifest)
    try:
        merged = merge_manifests(manifests)
    except ValueError as exc:
        raise DHRLabelError(f"cannot merge the manifests in {out_dir}: {exc}") from None
    merged["shard_runs"] = [
        {"shard": m["shard"], **{key: m.get(key) for key in PER_RUN}, "counts": m.get("counts", {})} for m in manifests
    ]
    for key in PER_RUN:
        merged.pop(key, None)
    merged["merged"] = {
        **environment(),
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": [path.name for path in files],
    }
    problems = problems_of(merged, manifests)
    merged["complete"] = not problems
    target = manifest_path(out_dir)
    if target.exists():
        try:
            previous = json.loads(target.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = None
        if not isinstance(previous, dict) or "shard_runs" not in previous:
            raise DHRLabelError(
                f"{target} exists and is not a merged manifest (an unsharded run wrote into {out_dir}?); move it away first"
            )
    try:
        write_manifest(target, merged)
    except OSError as exc:
        raise DHRLabelError(f"cannot write {target}: {exc.strerror or exc}") from None
    return merged, problems, target


def _summary(merged: dict, problems: list[str], target: Path, json_out: bool) -> None:
    counts = merged["counts"]
    shards = merged["shards"]
    total = shards[0].get("count") if shards else 0
    if json_out:
        print_json({
            "manifest": str(target), "shards": len(shards), "of": total, "complete": not problems,
            "counts": counts, "problems": problems, "failures": merged["failures"],
        })
        return
    table = Table(title="dhr-label merge-manifests", show_header=False, title_justify="left")
    table.add_row("shards", f"{len(shards)} of {total}")
    for key in ("selected", "done", "skipped", "failed", "not_run"):
        if key in counts:
            table.add_row(key.replace("_", " "), str(counts[key]))
    table.add_row("manifest", escape(str(target)))
    table.add_row("complete", "yes" if not problems else "no")
    out_console.print(table)
    failures = merged["failures"]
    if failures:
        err_console.print(f"{len(failures)} image(s) failed; the first ones:", highlight=False)
        for failure in failures[:SHOWN_FAILURES]:
            err_console.print(f"  {escape(failure['id'])}: {escape(failure['reason'])}", soft_wrap=True, highlight=False)
