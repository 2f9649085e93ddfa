"""The Typer application every command registers on, and the shared stderr console.

Results go to stdout (a table, or exactly one JSON document with ``--json``); progress, logs,
warnings and errors go to stderr through :data:`err_console`. Exit codes: 0 success, 1 runtime
failure (some image or file failed), 2 usage error (Typer's default), 130 interrupted.
"""
from __future__ import annotations

import functools
import sys
import traceback

import typer
from rich.console import Console

from ..errors import DHRLabelError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

app = typer.Typer(
    name="dhr-label",
    help="Refine weakly-supervised segmentation pseudo-masks with DHR (ECCV 2024), offline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

err_console = Console(stderr=True, highlight=False)
out_console = Console(highlight=False)

_state = {"debug": False}


@app.callback()
def _root(
    debug: bool = typer.Option(
        False, "--debug", help="Show Python tracebacks for unexpected errors.", envvar="DHR_LABEL_DEBUG"
    ),
) -> None:
    """Refine weakly-supervised segmentation pseudo-masks with DHR (ECCV 2024), offline."""
    _state["debug"] = debug


def fail(message: str, code: int = EXIT_FAILED) -> "typer.Exit":
    """Print ``error: message`` on stderr and return the exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True)
    return typer.Exit(code)


def guarded(command):
    """Turn user-facing errors into one clear line and an exit code, never a traceback.

    :class:`DHRLabelError` -> its message, exit 1; ``KeyboardInterrupt`` -> exit 130; anything
    else -> one line naming the exception (the traceback with ``--debug``), exit 1.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except typer.Exit:
            raise
        except DHRLabelError as exc:
            raise fail(str(exc)) from None
        except KeyboardInterrupt:
            err_console.print("interrupted", style="yellow")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:  # noqa: BLE001 - last line of defence for the user
            if _state["debug"]:
                traceback.print_exc(file=sys.stderr)
            raise fail(
                f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)"
            ) from None

    return wrapper
