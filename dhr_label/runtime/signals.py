"""Stopping a run cleanly: SIGTERM and SIGHUP as Ctrl-C in the parent, and workers that never
outlive it.

SLURM, Kubernetes and ``timeout`` pre-empt with SIGTERM, a closed terminal sends SIGHUP; both
become :class:`Terminated` (a ``KeyboardInterrupt``) in the main thread, so every ``except
KeyboardInterrupt`` path — stop the workers, remove temporaries, write the manifest and the
summary — runs for them too, and the exit status is the shell's ``128 + signal``.

Workers leave those signals to the parent (a terminal's Ctrl-C or a scheduler's SIGTERM often
reaches the whole process group) and watch it: a worker whose parent died (``kill -9``) exits
on its own instead of computing on as an orphan.
"""
from __future__ import annotations

import contextlib
import os
import platform
import signal
import threading
import time

#: Signals a run stops on, as Ctrl-C does.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
#: Seconds between a worker's checks that its parent is alive.
WATCH_EVERY = 0.5


class Terminated(KeyboardInterrupt):
    """The run received ``signum`` (SIGTERM or SIGHUP): stop as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code(interrupt: BaseException | None) -> int:
    """The exit status of a run stopped by ``interrupt``: 130 for Ctrl-C, 128 + N for signal N."""
    return 128 + (interrupt.signum if isinstance(interrupt, Terminated) else signal.SIGINT)


def stop_name(interrupt: BaseException) -> str:
    """``Ctrl-C``, ``SIGTERM`` or ``SIGHUP``, for messages."""
    return signal.Signals(interrupt.signum).name if isinstance(interrupt, Terminated) else "Ctrl-C"


@contextlib.contextmanager
def stop_on_signals():
    """Within the block (main thread only), SIGTERM and SIGHUP raise :class:`Terminated`.

    A second signal while the run is already stopping is ignored: the clean-up finishes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = []

    def handler(signum, frame):
        if stopping:
            return
        stopping.append(signum)
        raise Terminated(signum)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


_watching: list[int] = []


def become_worker(parent: int, host: str) -> None:
    """In a worker process of ``parent`` on ``host`` (once per process; no-op in the parent
    itself or in a thread): leave SIGINT, SIGTERM and SIGHUP to the parent, and exit when the
    parent dies.

    Only a direct child watches: the workers of a cluster (Dask) have their own parents, which
    their scheduler manages.
    """
    if os.getpid() == parent or threading.current_thread() is not threading.main_thread() or _watching:
        return
    for sig in (signal.SIGINT, *STOP_SIGNALS):
        signal.signal(sig, signal.SIG_IGN)
    if os.getppid() != parent:
        if host == platform.node() and not _alive(parent):  # its first task came after its parent died
            os._exit(1)
        return  # a cluster's worker, whose parent is its nanny
    _watching.append(parent)
    threading.Thread(target=_watch, args=(parent,), name="dhr-label-parent-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCH_EVERY)
    os._exit(1)  # reparented: the parent is gone, nobody will read this worker's results
