"""``--cluster dask --scheduler ADDRESS``: joblib's Dask backend on a cluster the test starts."""
import json

import numpy as np
import pytest
from helpers_bench import make_inputs  # noqa: E402
from PIL import Image
from typer.testing import CliRunner

from dhr_label.cli import app
from dhr_label.runtime import parallel
from dhr_label.runtime.parallel import chunked, cluster_threads, dask_client, map_chunks

distributed = pytest.importorskip("distributed")
runner = CliRunner()
IMAGES = 6


@pytest.fixture(scope="module")
def cluster():
    # Two worker processes, as on a cluster: the tasks and their results cross a process boundary.
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as local:
        yield local


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data")
    ids = make_inputs().generate(directory, IMAGES, scale="tiny", seed=11)
    return directory, ids


def refine(data_dir, out, *extra):
    return runner.invoke(app, [
        "refine", "--cams", str(data_dir / "cams.h5"), "--feats", str(data_dir / "feats.h5"), "--out", str(out), "--json", *extra,
    ])


def square(chunk):
    return [x * x for x in chunk]


def test_map_chunks_runs_on_the_cluster(cluster):
    chunks = chunked(list(range(10)), workers=2)
    with dask_client(cluster.scheduler_address) as client:
        assert cluster_threads(client) == 2
        results = list(map_chunks(square, chunks, workers=2, cluster="dask", client=client))
    assert sorted(x for chunk in results for x in chunk) == [x * x for x in range(10)]


def test_masks_equal_the_local_run(cluster, data, tmp_path):
    data_dir, ids = data
    result = refine(data_dir, tmp_path / "dask", "--cluster", "dask", "--scheduler", cluster.scheduler_address)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["counts"]["done"] == IMAGES and summary["counts"]["failed"] == 0
    run = json.loads((tmp_path / "dask" / "dhr-label-manifest.json").read_text())["runs"][-1]
    assert run["engine"]["cluster"] == "dask" and run["engine"]["workers"] == 2

    result = refine(data_dir, tmp_path / "loky", "--workers", "2")
    assert result.exit_code == 0, result.stderr
    for image_id in ids:
        dask_mask = np.asarray(Image.open(tmp_path / "dask" / f"{image_id}.png"))
        loky_mask = np.asarray(Image.open(tmp_path / "loky" / f"{image_id}.png"))
        assert np.array_equal(dask_mask, loky_mask), image_id


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--cluster", "dask"], "--cluster dask needs --scheduler"),
        (["--scheduler", "tcp://127.0.0.1:8786"], "it needs --cluster dask"),
        (["--cluster", "dask", "--scheduler", "tcp://127.0.0.1:8786", "--workers", "2"], "--workers applies to --cluster local"),
        (["--backend", "dask"], "--cluster dask needs --scheduler"),  # the option's name before 0.5 still means it
    ],
)
def test_usage_errors(data, tmp_path, extra, message):
    result = refine(data[0], tmp_path / "out", *extra)
    assert result.exit_code == 2
    assert message in result.stderr and message in json.loads(result.stdout)["error"]  # --json: one document
    assert ("--backend is called --cluster" in result.stderr) == ("--backend" in extra)


def test_a_bad_scheduler_address_is_one_line(data, tmp_path):
    result = refine(data[0], tmp_path / "out", "--cluster", "dask", "--scheduler", "nonsense://nowhere")
    assert result.exit_code == 1
    assert "is not a Dask scheduler address" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("error:") == 1


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory):
    """A scheduler and two worker processes started in a directory of their own, as on a
    cluster whose workers do not share the submitting shell's working directory."""
    import subprocess
    import sys

    cwd = tmp_path_factory.mktemp("workers-cwd")
    # dashboard_address ":0": its HTTP server on a free port (the module's other cluster holds 8787)
    with distributed.LocalCluster(n_workers=0, dashboard_address=":0") as local:
        workers = [
            subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", local.scheduler_address, "--nthreads", "1",
                              "--no-nanny", "--no-dashboard"], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(2)
        ]
        try:
            with distributed.Client(local.scheduler_address, set_as_default=False) as client:
                client.wait_for_workers(2, timeout=120)
            yield local.scheduler_address
        finally:
            for worker in workers:
                worker.terminate()
            for worker in workers:
                try:
                    worker.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    worker.kill()
                    worker.wait()


def test_relative_paths_reach_workers_started_elsewhere(elsewhere, data, tmp_path, monkeypatch):
    data_dir, ids = data
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").symlink_to(data_dir)
    relative = ["refine", "--cams", "in/cams.h5", "--feats", "in/feats.h5", "--json"]
    result = runner.invoke(app, [*relative, "--out", "dask", "--cluster", "dask", "--scheduler", elsewhere])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["counts"]["done"] == IMAGES
    result = runner.invoke(app, [*relative, "--out", "local", "--workers", "2"])
    assert result.exit_code == 0, result.stderr
    for image_id in ids:
        dask_mask = np.asarray(Image.open(tmp_path / "dask" / f"{image_id}.png"))
        local_mask = np.asarray(Image.open(tmp_path / "local" / f"{image_id}.png"))
        assert np.array_equal(dask_mask, local_mask), image_id


def test_an_unreachable_scheduler_is_reported_before_anything_is_written(data, tmp_path, monkeypatch):
    import socket

    monkeypatch.setattr(parallel, "CONNECT_TIMEOUT", "2s")  # the run's 20 s, shortened for the suite
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    out = tmp_path / "out"
    result = refine(data[0], out, "--cluster", "dask", "--scheduler", address)
    assert result.exit_code == 1
    assert f"cannot reach the Dask scheduler at {address}" in result.stderr
    assert not out.exists()  # no manifest, no pooled prototypes, no directory
