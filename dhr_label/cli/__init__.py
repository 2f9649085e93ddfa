"""The ``dhr-label`` command line: one module per command, all on :data:`app.app`."""
from __future__ import annotations

from . import inspect, refine, score, show  # noqa: F401  (each module registers its command)
from . import pack  # noqa: F401
from . import merge  # noqa: F401
from .app import app


def main() -> None:
    """Entry point of the ``dhr-label`` console script."""
    app()
