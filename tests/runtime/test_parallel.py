"""Local worker pools: chunks, and workers that never outlive the process that started them."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers_h5 import alive

from dhr_label.runtime.parallel import chunked, map_chunks

linux_only = pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="watches processes through /proc")


def test_chunks_cover_the_items_in_order_and_respect_the_size_cap():
    items = list(range(1000))
    chunks = chunked(items, workers=2, per_worker=4, max_size=100)
    assert [x for chunk in chunks for x in chunk] == items
    assert max(len(chunk) for chunk in chunks) == 100
    assert chunked([], workers=2) == []


def test_map_chunks_gives_every_result_once_with_workers():
    chunks = chunked(list(range(40)), workers=2, per_worker=4)
    done = []
    results = list(map_chunks(_squares, chunks, workers=2, on_done=lambda chunk, result: done.append(chunk)))
    assert sorted(x for result in results for x in result) == [x * x for x in range(40)]
    assert sorted(map(tuple, done)) == sorted(map(tuple, chunks))


def _squares(chunk):
    return [x * x for x in chunk]


# A pool whose tasks never call anything of ours: only the pool's own set-up can make its
# workers watch their parent. Both tasks block, so neither worker would ever finish on its own.
# (A function of the script's __main__ travels to the workers by value.)
POOL = textwrap.dedent("""
    import os, time
    from pathlib import Path
    from dhr_label.runtime.parallel import map_chunks

    def block_forever(chunk):
        Path(chunk[0]).write_text(str(os.getpid()))
        while True:
            time.sleep(1)

    out = Path({out!r})
    list(map_chunks(block_forever, [[str(out / "a")], [str(out / "b")]], workers=2))
""")


@linux_only
def test_workers_exit_when_their_parent_is_killed_even_if_their_task_never_checks(tmp_path):
    script = POOL.format(out=str(tmp_path))
    process = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / name).exists() and (tmp_path / name).read_text() for name in "ab"):
            assert process.poll() is None, "the pool script ended early"
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.05)
        workers = [int((tmp_path / name).read_text()) for name in "ab"]
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [p for p in workers if alive(p)] == [], "orphaned workers kept running"
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
