"""One level of parallelism: chunks of image ids over joblib worker processes."""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """All the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def chunked(items: Sequence[T], *, workers: int, per_worker: int = 4, max_size: int = 256) -> list[list[T]]:
    """Split ``items`` into about ``per_worker`` chunks per worker, each at most ``max_size``.

    Chunks amortise the cost of a task; several per worker keep the progress bar moving and
    the workers evenly loaded.
    """
    if not items:
        return []
    size = math.ceil(len(items) / max(1, workers * per_worker))
    size = max(1, min(size, max_size))
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def map_chunks(
    function: Callable[[list[T]], R],
    chunks: Sequence[list[T]],
    *,
    workers: int,
    on_done: Callable[[list[T], R], None] | None = None,
) -> Iterator[R]:
    """Yield ``function(chunk)`` for every chunk, as they complete (order not kept).

    With one worker, or one chunk, everything runs in this process (no start-up cost).
    ``function`` must be a module-level function: it is pickled to the workers, which open
    their own files. ``on_done(chunk, result)`` runs in this process after each chunk, e.g. to
    advance the one progress bar.
    """
    workers = max(1, min(workers, len(chunks)))
    if workers == 1:
        results = ((chunk, function(chunk)) for chunk in chunks)
    else:
        from joblib import Parallel, delayed

        parallel = Parallel(n_jobs=workers, return_as="generator_unordered")
        results = parallel(delayed(_tagged)(function, chunk) for chunk in chunks)
    for chunk, result in results:
        if on_done is not None:
            on_done(chunk, result)
        yield result


def _tagged(function, chunk):
    return chunk, function(chunk)
