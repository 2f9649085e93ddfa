"""One level of parallelism: chunks of image ids over joblib workers.

Two places to run: ``local`` (joblib's loky processes on this machine, the default) and
``dask`` (the workers of a Dask distributed cluster through joblib's Dask backend, reached
through its scheduler). Either way a worker
gets a module-level function and a chunk of ids, opens its own files and returns small
results; nothing here is an RPC layer of its own.
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from threadpoolctl import threadpool_limits

from ..errors import DHRLabelError
from .signals import become_worker

T = TypeVar("T")
R = TypeVar("R")

CLUSTERS = ("local", "dask")
#: How long a Dask client keeps trying to reach its scheduler before the run gives up.
CONNECT_TIMEOUT = "20s"


def default_workers() -> int:
    """All the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def chunked(items: Sequence[T], *, workers: int, per_worker: int = 64, max_size: int = 256) -> list[list[T]]:
    """Split ``items`` into about ``per_worker`` chunks per worker, each at most ``max_size``.

    Chunks amortise the cost of a task. Many per worker keep the workers evenly loaded to the
    end: a worker that draws the last chunk leaves the others idle for at most one chunk,
    ``1 / per_worker`` of the run (an image is ~1 s of DenseCRF, a task costs milliseconds).
    """
    if not items:
        return []
    size = math.ceil(len(items) / max(1, workers * per_worker))
    size = max(1, min(size, max_size))
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


@contextlib.contextmanager
def dask_client(scheduler: str):
    """A Dask ``distributed.Client`` connected to the scheduler at ``scheduler`` (e.g.
    ``tcp://host:8786``) for the block, closed on exit. A caller that already holds a client
    passes it to :func:`map_chunks` directly."""
    try:  # optional: the `dask` extra (pip install 'dhr-label[dask]'), imported only for --cluster dask
        from distributed import Client
        from distributed.comm import parse_address
        from distributed.comm.registry import get_backend
    except ImportError:
        raise DHRLabelError("--cluster dask needs Dask distributed, the optional dask extra: pip install 'dhr-label[dask]' (or 'dask[distributed]')") from None
    try:
        # A bad scheme is caught here: a Client that fails on it leaves noise at exit.
        get_backend(parse_address(scheduler)[0])
    except ValueError as exc:
        raise DHRLabelError(f"--scheduler {scheduler!r} is not a Dask scheduler address (e.g. tcp://host:8786): {exc}") from None
    try:
        client = Client(scheduler, timeout=CONNECT_TIMEOUT, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise DHRLabelError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from None
    try:
        yield client
    finally:
        client.close()


def cluster_threads(client) -> int:
    """How many tasks the cluster runs at once (the sum of its workers' threads)."""
    return max(1, sum(client.nthreads().values()))


def map_chunks(
    function: Callable[[list[T]], R],
    chunks: Sequence[list[T]],
    *,
    workers: int,
    on_done: Callable[[list[T], R], None] | None = None,
    cluster: str = "local",
    client=None,
) -> Iterator[R]:
    """Yield ``function(chunk)`` for every chunk, as they complete (order not kept).

    ``local``: ``workers`` (loky) processes on this machine, each with one BLAS/OpenMP thread (they
    parallelise over images; docs/performance.md). With one worker, or one chunk, everything
    runs in this process (no start-up cost). ``dask``: the chunks go to the workers of the
    cluster ``client`` is connected to (see :func:`dask_client`); ``workers`` is not used.

    ``function`` must be a module-level function: it is pickled to the workers, which open
    their own files. ``on_done(chunk, result)`` runs in this process after each chunk, e.g. to
    advance the one progress bar.
    """
    if cluster not in CLUSTERS:
        raise ValueError(f"cluster must be one of {CLUSTERS}, got {cluster!r}")
    from joblib import Parallel, delayed, parallel_config

    tasks = (delayed(_tagged)(function, chunk) for chunk in chunks)
    if cluster == "dask":
        if client is None:
            raise ValueError("the dask cluster needs a connected client (see dask_client)")
        with parallel_config(backend="dask", client=client):
            yield from _deliver(Parallel(n_jobs=-1, return_as="generator_unordered")(tasks), on_done)
        return
    workers = max(1, min(workers, len(chunks)))
    if workers == 1:
        # One BLAS thread here too, as in the workers: OpenBLAS rounds some products
        # differently on 2 threads, and masks must not depend on the worker count.
        with threadpool_limits(limits=1):
            yield from _deliver(((chunk, function(chunk)) for chunk in chunks), on_done)
        return
    with parallel_config(backend="loky", inner_max_num_threads=1):
        yield from _deliver(Parallel(n_jobs=workers, return_as="generator_unordered", **_watched())(tasks), on_done)


def map_ordered(function: Callable[[list[T]], R], chunks: Sequence[list[T]], *, workers: int, ahead: int) -> Iterator[R]:
    """Yield ``function(chunk)`` for every chunk in order, computed ``ahead`` chunks in advance.

    For a consumer that must see results in a fixed order (device batches formed from the ids'
    order) while workers read ahead of it. ``workers`` loky processes, one BLAS thread each; 1:
    lazily, in this process. Closing the generator stops the workers.
    """
    from joblib import Parallel, delayed, parallel_config

    if workers <= 1 or len(chunks) <= 1:
        with threadpool_limits(limits=1):
            yield from (function(chunk) for chunk in chunks)
        return
    with parallel_config(backend="loky", inner_max_num_threads=1):
        results = Parallel(n_jobs=workers, return_as="generator", pre_dispatch=max(workers, ahead), **_watched())(
            delayed(function)(chunk) for chunk in chunks
        )
        try:
            yield from results
        finally:
            _close(results)


def _watched() -> dict:
    """Options for a loky pool whose workers watch this process from the moment they start.

    A worker started here exits when this process dies, even one that never received a task
    (on a fast machine the first worker can take every early task while the second is still
    importing; loky would keep that one waiting for work for its idle timeout, 300 s).
    """
    return {"initializer": become_worker, "initargs": (os.getpid(), platform.node())}


def _deliver(results, on_done):
    """Yield the results; closing this generator early closes ``results`` (stops the workers)."""
    try:
        for chunk, result in results:
            if on_done is not None:
                on_done(chunk, result)
            yield result
    finally:
        _close(results)


def _close(results) -> None:
    """Close a joblib result generator. Stopping early is what the caller asked for (``--strict``,
    Ctrl-C): joblib's advice about cancelled tasks is not for the user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*tasks which were still being processed", category=UserWarning)
        results.close()


def _tagged(function, chunk):
    return chunk, function(chunk)
