"""``dhr-label merge-manifests``: one manifest for the shards of a ``refine --shard I/N`` job."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..runtime.merge import merge_directory
from .app import EXIT_FAILED, EXIT_OK, app, err_console, guarded, print_json

SHOWN_FAILURES = 10


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
    merged, problems, target = merge_directory(out_dir)
    _summary(merged, problems, target, json_out)
    for problem in problems:
        err_console.print(f"[bold red]error:[/] {escape(problem)}", markup=True, soft_wrap=True)
    raise typer.Exit(EXIT_FAILED if problems else EXIT_OK)


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
    err_console.print(table)
    failures = merged["failures"]
    if failures:
        err_console.print(f"{len(failures)} image(s) failed; the first ones:", highlight=False)
        for failure in failures[:SHOWN_FAILURES]:
            err_console.print(f"  {escape(failure['id'])}: {escape(failure['reason'])}", soft_wrap=True, highlight=False)
