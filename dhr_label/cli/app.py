"""The Typer application every command registers on, and the shared stderr console.

Results go to stdout (a table, or exactly one JSON document with ``--json``); progress, logs,
warnings and errors go to stderr through :data:`err_console`. Exit codes: 0 success, 1 runtime
failure (some image or file failed), 2 usage error (Typer's default), 130 interrupted.
"""
from __future__ import annotations

import contextlib
import functools
import json
import sys
import traceback
from pathlib import Path

import typer
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from typer.core import TyperGroup

from .._version import __version__
from ..errors import DHRLabelError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: Where ``refine`` writes masks and ``score`` / ``show`` look for them unless told otherwise,
#: so that ``refine ...`` then ``score --gt gt/`` chain.
DEFAULT_MASKS_DIR = Path("masks")

class _Commands(TyperGroup):
    """The command group, keeping ``--json``'s promise for usage errors too.

    Typer reports a usage error (an unknown option, a value out of range, a missing required
    option: exit 2) on stderr before any command code runs, so :func:`guarded` never sees it;
    here, when ``--json`` is among the arguments, one JSON error document goes to stdout as well.
    """

    def make_context(self, info_name, args, parent=None, **extra):
        with self._json_usage_errors(list(args)):
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx):
        with self._json_usage_errors([*ctx._protected_args, *ctx.args]):
            return super().invoke(ctx)

    @contextlib.contextmanager
    def _json_usage_errors(self, args: list[str]):
        """``{"tool", "error"}`` on stdout for a usage error when ``args`` hold ``--json``."""
        try:
            yield
        except typer.TyperException as exc:  # Typer's usage errors (UsageError, BadParameter...) derive from it
            if getattr(exc, "exit_code", None) == EXIT_USAGE and "--json" in args:
                command = args[0] if args and args[0] in self.commands else None
                print_json({"tool": f"dhr-label {command}" if command else "dhr-label", "error": exc.format_message()})
            raise


app = typer.Typer(
    name="dhr-label",
    cls=_Commands,
    help="Refine weakly-supervised segmentation pseudo-masks with DHR (ECCV 2024), offline.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

class _Console(Console):
    """A Rich console that never cuts a table to fit a width nobody sees: on a terminal it is
    the terminal's width, but when its stream is a pipe or a file (``| less``, ``> report.txt``)
    Rich would take 80 columns (or another stream's terminal) and crop the last columns; there
    each line is as wide as its content. ``COLUMNS`` set by the user still wins."""

    @property
    def size(self) -> ConsoleDimensions:
        measured = Console.size.fget(self)
        if self._width is None and not self.is_terminal:
            return ConsoleDimensions(UNCUT_WIDTH, measured.height)
        return measured

    @size.setter
    def size(self, new_size) -> None:
        Console.size.fset(self, new_size)


#: The width of a console whose stream is not a terminal: wider than any table dhr-label prints.
UNCUT_WIDTH = 10_000

err_console = _Console(stderr=True, highlight=False)
out_console = _Console(highlight=False)

_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        print(f"dhr-label {__version__}")
        raise typer.Exit(EXIT_OK)


@app.callback()
def _root(
    debug: bool = typer.Option(
        False, "--debug", help="Show Python tracebacks for unexpected errors.", envvar="DHR_LABEL_DEBUG"
    ),
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", callback=_version, is_eager=True
    ),
) -> None:
    """Refine weakly-supervised segmentation pseudo-masks with DHR (ECCV 2024), offline.

    Formats and algorithm: docs/format.md and docs/algorithm.md of the dhr-label repository.
    """
    _state["debug"] = debug


class _UsageError(typer.BadParameter):
    """Typer's usage error (exit 2); one that names no option (a rule across options) is worded
    by its message alone, not as Typer's "Invalid value: ..."."""

    def format_message(self) -> str:
        return super().format_message() if self.param_hint or self.param else self.message


def usage_error(message: str, option: str | None = None) -> typer.BadParameter:
    """A usage error (exit 2, Typer's message format) for an invalid option value, or for a rule
    across options when ``option`` is None."""
    return _UsageError(message, param_hint=option)


def fail(message: str, code: int = EXIT_FAILED) -> "typer.Exit":
    """Print ``error: message`` on stderr and return the exit to raise."""
    # escape: messages quote shapes like [K, h, w] and paths, which are not markup
    err_console.print(f"[bold red]error:[/] {escape(message)}", markup=True, soft_wrap=True)
    return typer.Exit(code)


def guarded(command):
    """Turn user-facing errors into one clear line and an exit code, never a traceback.

    :class:`DHRLabelError` -> its message, exit 1; ``KeyboardInterrupt`` -> exit 130; anything
    else -> one line naming the exception (the traceback with ``--debug``), exit 1.
    """

    name = command.__name__.removesuffix("_command").replace("_", "-")

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        # With --json, a failure is one JSON document on stdout as well (a pipeline that parses
        # stdout always gets one), beside the line on stderr.
        document = (lambda error, **more: print_json({"tool": f"dhr-label {name}", "error": error, **more})) \
            if kwargs.get("json_out") else (lambda error, **more: None)
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise  # usage errors (typer's own exceptions) keep Typer's message and exit code 2
        except DHRLabelError as exc:
            if _state["debug"]:
                traceback.print_exc(file=sys.stderr)
            document(str(exc), **getattr(exc, "details", {}))
            raise fail(str(exc)) from None
        except KeyboardInterrupt:
            document("interrupted")
            err_console.print("interrupted", style="yellow")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:  # noqa: BLE001 - last line of defence for the user
            if _state["debug"]:
                traceback.print_exc(file=sys.stderr)
            message = f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)"
            document(message)
            raise fail(message) from None

    return wrapper


class _Advance:
    """``advance(n)`` moves the bar by n; ``advance.total(n)`` sets the total once known."""

    def __init__(self, progress: Progress, task):
        self._progress, self._task = progress, task

    def __call__(self, n: int = 1) -> None:
        self._progress.advance(self._task, n)

    def total(self, n: int) -> None:
        self._progress.update(self._task, total=n)

    def phase(self, description: str, n: int) -> None:
        """Start the bar again for another phase of the run, with its own total."""
        self._progress.update(self._task, description=description, total=n, completed=0)


@contextlib.contextmanager
def progress_bar(description: str, total: int | None):
    """A Rich progress bar on stderr; yields an :class:`_Advance` for the work loop."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err_console, transient=True, disable=not err_console.is_terminal) as progress:
        yield _Advance(progress, progress.add_task(description, total=total))


def print_json(document: dict) -> None:
    """Exactly one JSON document on stdout (NaN is not JSON: reports hold None instead)."""
    sys.stdout.write(json.dumps(document, indent=2, allow_nan=False) + "\n")


def percent(value: float | None, digits: int = 1) -> str:
    """``81.5`` for 0.815, ``-`` for an undefined value."""
    return "-" if value is None else f"{100 * value:.{digits}f}"
