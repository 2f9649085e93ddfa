"""``--backend dask --scheduler ADDRESS``: joblib's Dask backend on a cluster the test starts."""
import json

import numpy as np
import pytest
from helpers_bench import make_inputs  # noqa: E402
from PIL import Image
from typer.testing import CliRunner

from dhr_label.cli import app
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
        results = list(map_chunks(square, chunks, workers=2, backend="dask", client=client))
    assert sorted(x for chunk in results for x in chunk) == [x * x for x in range(10)]


def test_masks_equal_the_loky_run(cluster, data, tmp_path):
    data_dir, ids = data
    result = refine(data_dir, tmp_path / "dask", "--backend", "dask", "--scheduler", cluster.scheduler_address)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["counts"]["done"] == IMAGES and summary["counts"]["failed"] == 0
    run = json.loads((tmp_path / "dask" / "dhr-label-manifest.json").read_text())["runs"][-1]
    assert run["engine"]["backend"] == "dask" and run["engine"]["workers"] == 2

    result = refine(data_dir, tmp_path / "loky", "--workers", "2")
    assert result.exit_code == 0, result.stderr
    for image_id in ids:
        dask_mask = np.asarray(Image.open(tmp_path / "dask" / f"{image_id}.png"))
        loky_mask = np.asarray(Image.open(tmp_path / "loky" / f"{image_id}.png"))
        assert np.array_equal(dask_mask, loky_mask), image_id


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--backend", "dask"], "--backend dask needs --scheduler"),
        (["--scheduler", "tcp://127.0.0.1:8786"], "it needs --backend dask"),
        (["--backend", "dask", "--scheduler", "tcp://127.0.0.1:8786", "--workers", "2"], "--workers applies to --backend loky"),
    ],
)
def test_usage_errors(data, tmp_path, extra, message):
    result = refine(data[0], tmp_path / "out", *extra)
    assert result.exit_code == 2
    assert message in result.stderr and message in json.loads(result.stdout)["error"]  # --json: one document


def test_a_bad_scheduler_address_is_one_line(data, tmp_path):
    result = refine(data[0], tmp_path / "out", "--backend", "dask", "--scheduler", "nonsense://nowhere")
    assert result.exit_code == 1
    assert "is not a Dask scheduler address" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("error:") == 1
