"""The ``dhr-label`` command line: one module per command, all on :data:`app.app`."""
from __future__ import annotations

from . import features, inspect, merge, pack, refine, score, show, tune  # noqa: F401  (each module registers its command)
from .app import app


def main() -> None:
    """Entry point of the ``dhr-label`` console script."""
    app(prog_name="dhr-label")
