"""The batched torch path (core/batched.py, runtime/gpu_run.py) against the numpy core, on CPU.

Every batched op is checked image by image against the numpy function it replaces, on batches
whose images differ in cells, tags and classes (so padding and masks are exercised); then the
whole ``--device`` orchestration runs with torch on the CPU and its masks are compared pixel by
pixel with the CPU path's.
"""
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from dhr_label.core import batched, cap, dhr, ot, resize  # noqa: E402
from dhr_label.core.ot import OTConvergenceWarning  # noqa: E402
from dhr_label.io.contract import CamsFile  # noqa: E402
from dhr_label.params import CapMode, DHRParams, Marginal, OTParams, Steps  # noqa: E402
from dhr_label.presets import preset_from_classes  # noqa: E402
from dhr_label.runtime.gpu_run import run_images_batched  # noqa: E402
from dhr_label.runtime.refine_run import RefineJob, run_images  # noqa: E402
from helpers_bench import make_inputs  # noqa: E402

CPU = torch.device("cpu")
PLAN_ATOL = 1e-7  # plans hold ~1/(N K) ~ 1e-3: float32 rounding of a different summation order
MAP_ATOL = 2e-5  # maps in [0, 1] after min-max, OT and cosines in float32
AGREEMENT = 0.999  # end to end: a CRF may flip a pixel on a float32 near-tie
# Steps 2-3 chain cosines, three OT calls (up to max_iter Sinkhorn iterations where one does
# not converge) and min-max stretches: float32 rounding grows to ~1e-5 of the [0, 1] range.
HEAT_ATOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """As the device path does on a CPU: tiny ops on 2 threads of a busy machine crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def padded(arrays):
    values, shapes = batched.pad_stack(arrays, CPU)
    rows = batched.length_mask([s[0] for s in shapes], values.shape[1], CPU)
    cols = batched.length_mask([s[1] for s in shapes], values.shape[2], CPU)
    return values, rows, cols


SHAPES = [(50, 4), (30, 2), (64, 7), (10, 1), (3, 3)]


def score_batch(seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [rng.uniform(0, 1, shape).astype(np.float32) for shape in shapes]


# ----------------------------------------------------------------------------------------------
# f_OT
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kl_weight", [None, 0.1])
def test_sinkhorn_matches_numpy_plan_and_stopping_iteration(kl_weight):
    scores = score_batch(shapes=SHAPES[:3] + SHAPES[4:])
    values, rows, cols = padded(scores)
    result = batched.sinkhorn(values, rows, cols, kl_weight=kl_weight)
    for b, s in enumerate(scores):
        ref = ot.sinkhorn(s, kl_weight=kl_weight)
        n, k = s.shape
        assert int(result.iterations[b]) == ref.iterations  # frozen at its own check
        np.testing.assert_allclose(result.plan[b, :n, :k].numpy(), ref.plan, atol=PLAN_ATOL)
        assert float(result.plan[b, n:].abs().sum()) == 0 and float(result.plan[b, :, k:].abs().sum()) == 0
        assert bool(result.converged[b]) == ref.converged


def test_sinkhorn_class_marginal_per_image():
    scores = score_batch(seed=1, shapes=[(40, 4), (25, 3)])
    marginals = [np.array([0.1, 0.2, 0.3, 0.4]), np.array([5.0, 3.0, 2.0])]  # the second unnormalised
    values, rows, cols = padded(scores)
    v = torch.zeros(2, 4)
    v[0], v[1, :3] = torch.as_tensor(marginals[0]), torch.as_tensor(marginals[1])
    result = batched.sinkhorn(values, rows, cols, col_marginal=v)
    for b, (s, m) in enumerate(zip(scores, marginals)):
        ref = ot.sinkhorn(s, col_marginal=m)
        np.testing.assert_allclose(result.plan[b, : s.shape[0], : s.shape[1]].numpy(), ref.plan, atol=PLAN_ATOL)
        # The class marginal holds: column sums are m / sum(m).
        np.testing.assert_allclose(result.plan[b, : s.shape[0], : s.shape[1]].sum(0).numpy(), m / m.sum(), atol=1e-6)


def test_f_ot_matches_numpy_including_one_class_and_the_log_domain():
    scores = score_batch(seed=2)
    scores.append(np.random.default_rng(3).uniform(0, 30, (20, 3)).astype(np.float32))  # log domain
    values, rows, cols = padded(scores)
    out, notes = batched.f_ot(values, rows, cols, DHRParams())
    for b, s in enumerate(scores):
        np.testing.assert_allclose(out[b, : s.shape[0], : s.shape[1]].numpy(), ot.f_ot(s), atol=MAP_ATOL)
    assert notes == [None] * len(scores)
    np.testing.assert_array_equal(out[3, :10, :1].numpy(), 1.0)  # K = 1: nothing to transport


def test_f_ot_warns_as_numpy_when_sinkhorn_stops_at_max_iter():
    scores = score_batch(seed=4, shapes=[(50, 4)])
    params = DHRParams(ot=OTParams(max_iter=3))
    out, notes = batched.f_ot(*padded(scores), params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ot.f_ot(scores[0], max_iter=3)
    (warning,) = [w for w in caught if w.category is OTConvergenceWarning]
    assert notes[0].startswith("OTConvergenceWarning: Sinkhorn did not converge: marginal error ")
    assert notes[0].endswith(">= tol 1e-05 after 3 iterations") and str(warning.message).endswith("after 3 iterations")


# ----------------------------------------------------------------------------------------------
# Step 1, CAP, heat maps, resize
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("marginal_init, ot_on", [(Marginal.uniform, True), (Marginal.area, True), (Marginal.unbalanced, True), (Marginal.uniform, False)])
def test_seed_scores_match_numpy(marginal_init, ot_on):
    rng = np.random.default_rng(5)
    shapes = [(3, 24, 32), (1, 20, 15), (5, 30, 40), (2, 8, 8)]
    cams = [rng.normal(0, 1, s).astype(np.float32) for s in shapes]
    labels = [np.arange(1, s[0] + 1) for s in shapes]
    bases = [rng.integers(0, 6, (48, 64)).astype(np.uint8), None, rng.integers(0, 7, (60, 80)).astype(np.uint8), None]
    params = DHRParams(marginal_init=marginal_init, steps=Steps(ot=ot_on))
    out, notes = batched.seed_scores(cams, labels, bases, params, CPU)
    for cam, tags, base, got in zip(cams, labels, bases, out):
        assert got.shape == cam.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, dhr.seed_scores(cam, params, base, tags), atol=MAP_ATOL)
    assert notes == [None] * 4


def label_maps(seed=6):
    rng = np.random.default_rng(seed)
    inits = [rng.integers(0, 4, (97, 131)).astype(np.uint8), rng.integers(0, 3, (50, 40)).astype(np.uint8)]
    inits[0][:5] = 255  # ignore pixels count for no class
    inits[1][inits[1] == 2] = 7
    return inits, [np.array([0, 1, 3]), np.array([0, 1, 7])], [(12, 16), (7, 5)]


@pytest.mark.parametrize("mode", ["soft", "majority"])
def test_cell_fractions_equal_numpy(mode):
    inits, classes, grids = label_maps()
    weights, cells = batched.cell_fractions(inits, classes, grids, mode, CPU)
    for b in range(2):
        ref = cap.class_cell_fractions(inits[b], classes[b], grids[b], mode=mode)
        g, n = ref.shape
        np.testing.assert_array_equal(weights[b, :g, :n].numpy(), ref)  # pixel counts: exact
        assert float(weights[b, g:].sum()) == 0 and float(weights[b, :, n:].sum()) == 0
        assert int(cells[b].sum()) == n


def test_heat_maps_match_numpy():
    inits, classes, grids = label_maps(seed=7)
    rng = np.random.default_rng(8)
    features = [rng.normal(size=(16, h * w)).astype(np.float32) for h, w in grids]
    weights, cells = batched.cell_fractions(inits, classes, grids, "soft", CPU)
    stacked, _ = batched.pad_stack(features, CPU)
    maps, centroids = batched.heat_maps(stacked, weights, cells, 1e-5)
    for b in range(2):
        ref_maps, ref_centroids = cap.heat_maps(features[b], cap.class_cell_fractions(inits[b], classes[b], grids[b]))
        g, n = ref_maps.shape
        np.testing.assert_allclose(maps[b, :g, :n].numpy(), ref_maps, atol=MAP_ATOL)
        np.testing.assert_allclose(centroids[b, :g].numpy(), ref_centroids, atol=1e-5)


@pytest.mark.parametrize("size", [(24, 17), (6, 4), (12, 9)])
def test_resize_matches_numpy(size):
    x = np.random.default_rng(9).normal(size=(64, 12, 9)).astype(np.float32)
    got = batched.resize_bilinear(torch.as_tensor(x), size).numpy()
    np.testing.assert_allclose(got, resize.resize_bilinear(x, size), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Steps 2-3 as a whole
# ----------------------------------------------------------------------------------------------
def rebalance_case(seed=10):
    """Three images of different sizes, grids and class counts; siblings share a prototype,
    so Step 3 finds groups."""
    rng = np.random.default_rng(seed)
    cases = []
    for (height, width), members, grid in [((64, 80), [0, 2, 5, 9], (16, 20)), ((40, 30), [1, 3], (8, 6)), ((72, 96), [0, 4, 6], (12, 16))]:
        init = np.asarray(members, dtype=np.uint8)[rng.integers(0, len(members), (height // 8, width // 8))]
        init = np.kron(init, np.ones((8, 8), dtype=np.uint8))
        init[:3, :3] = 255
        proto = rng.normal(size=(10, 24)).astype(np.float32)
        proto[5] = proto[2] + 0.05 * rng.normal(size=24)  # 2 and 5 are siblings: one group
        proto[6] = proto[4] + 0.05 * rng.normal(size=24)

        def features(grid_hw, dim):
            fractions = cap.class_cell_fractions(init, np.arange(10), grid_hw)
            base = (proto.T @ fractions)[:dim] if dim <= 24 else np.tile(proto.T @ fractions, (dim // 24, 1))
            return (base + 0.1 * rng.normal(size=base.shape)).astype(np.float32).reshape(dim, *grid_hw)

        half = (max(1, grid[0] // 2), max(1, grid[1] // 2))
        cases.append((init, features(grid, 24), [features(half, 48), features(grid, 24)]))
    return cases


@pytest.mark.parametrize("row", [5, 6, 7])
@pytest.mark.parametrize("cap_mode", [CapMode.soft, CapMode.majority])
def test_rebalance_heat_matches_numpy(row, cap_mode):
    params = DHRParams(steps=Steps.row(row), cap=cap_mode, tau=0.8)
    cases = rebalance_case()
    classes = [dhr.init_classes(init) for init, _, _ in cases]
    out = batched.rebalance_heat(
        [init for init, _, _ in cases], classes,
        [torch.as_tensor(u) for _, u, _ in cases] if params.steps.uss else None,
        [[torch.as_tensor(layer) for layer in w] for _, _, w in cases] if params.steps.wss else None,
        params, CPU,
    )
    for b, (init, uss, wss) in enumerate(cases):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            heat, groups, _ = dhr.rebalance_heat(init, classes[b], uss, wss, params)
        assert out.heat[b].shape == heat.shape
        np.testing.assert_allclose(out.heat[b], heat, atol=HEAT_ATOL)
        assert out.groups[b] == groups
        assert len(out.warnings[b]) == len([w for w in caught if w.category is OTConvergenceWarning])
    if row == 7:
        assert [g for g in out.groups if g] == [[[2, 5]], [[4, 6]]]  # the siblings, where present


# ----------------------------------------------------------------------------------------------
# The orchestration, end to end, torch on the CPU
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data")
    ids = make_inputs().generate(directory, 8, scale="tiny", seed=21)
    with CamsFile.open(directory / "cams.h5") as cams:
        preset = preset_from_classes(cams.classes, cams.background)
    return directory, ids, preset


def job_for(dataset, out: Path, params: DHRParams) -> RefineJob:
    directory, _, preset = dataset
    out.mkdir(parents=True, exist_ok=True)
    return RefineJob(
        cams=directory / "cams.h5", feats=directory / "feats.h5", out=out, params=params,
        background=preset.background, palette=preset.palette,
    )


def masks(out: Path, ids):
    return {i: np.asarray(Image.open(out / f"{i}.png")) for i in ids}


@pytest.mark.parametrize("params", [DHRParams(), DHRParams(tau=0.5, cap=CapMode.majority), DHRParams(steps=Steps.row(4))], ids=["default", "groups", "row4"])
def test_device_path_masks_agree_with_the_cpu_path(dataset, tmp_path, params):
    _, ids, _ = dataset
    cpu = list(run_images(job_for(dataset, tmp_path / "cpu", params), ids, workers=1))
    dev = list(run_images_batched(job_for(dataset, tmp_path / "dev", params), ids, workers=2, device="cpu", batch_size=3))
    assert sorted(r.image_id for r in dev) == sorted(ids)
    assert all(r.status == "done" for r in cpu + dev), [r.reason for r in cpu + dev if r.reason]
    a, b = masks(tmp_path / "cpu", ids), masks(tmp_path / "dev", ids)
    same = sum(int((a[i] == b[i]).sum()) for i in ids)
    total = sum(a[i].size for i in ids)
    assert same / total >= AGREEMENT
    assert {r.image_id: r.restored for r in dev} == {r.image_id: r.restored for r in cpu}
    keys = {"read", "step1_ot", "crf1", "integrate", "write"} | ({"heat_maps_ot", "crf2"} if params.steps.rebalance else set())
    assert all(keys <= set(r.timings) for r in dev if r.image_id in {i for i in ids})


def test_device_path_reports_a_bad_image_as_the_cpu_path(dataset, tmp_path):
    _, ids, _ = dataset
    wanted = [ids[0], "no_such_image", ids[1]]
    cpu = {r.image_id: r for r in run_images(job_for(dataset, tmp_path / "cpu", DHRParams()), wanted, workers=1)}
    dev = {r.image_id: r for r in run_images_batched(job_for(dataset, tmp_path / "dev", DHRParams()), wanted, workers=1, device="cpu")}
    assert dev["no_such_image"].status == "failed"
    assert dev["no_such_image"].reason == cpu["no_such_image"].reason
    assert dev[ids[0]].status == dev[ids[1]].status == "done"
    assert not (tmp_path / "dev" / "no_such_image.png").exists()


@pytest.mark.parametrize("stage", ["seed_scores", "rebalance_heat"])
def test_an_image_the_device_batch_cannot_take_fails_alone(dataset, tmp_path, monkeypatch, stage):
    _, ids, _ = dataset
    with CamsFile.open(dataset[0] / "cams.h5") as cams:
        bad_cam, _ = cams.read_cam(ids[2])
    original = getattr(batched, stage)
    marked = {}

    def failing(*args, **kwargs):  # stands for a device error on one image of the batch
        if stage == "seed_scores" and any(c.shape == bad_cam.shape and np.array_equal(c, bad_cam) for c in args[0]):
            raise ValueError("device maths failed")
        if stage == "rebalance_heat" and any(i is marked.get("init") for i in args[0]):
            raise ValueError("device maths failed")
        return original(*args, **kwargs)

    if stage == "rebalance_heat":  # the bad image's M_init, as it comes back from its worker
        from dhr_label.runtime import gpu_run

        drain = gpu_run._drain

        def spy(outbox, flight, load, returned, ready, *, block):
            drain(outbox, flight, load, returned, ready, block=block)
            for image_id, init, _ in returned:
                if image_id == ids[2]:
                    marked["init"] = init

        monkeypatch.setattr(gpu_run, "_drain", spy)
    monkeypatch.setattr(batched, stage, failing)
    results = {r.image_id: r for r in run_images_batched(job_for(dataset, tmp_path / "dev", DHRParams()), ids, workers=2, device="cpu", batch_size=4)}
    assert results[ids[2]].status == "failed"
    assert results[ids[2]].reason.startswith("internal error ValueError: device maths failed")
    assert all(results[i].status == "done" for i in ids if i != ids[2])
    assert not (tmp_path / "dev" / f"{ids[2]}.png").exists()


def test_closing_early_stops_the_workers(dataset, tmp_path):
    import multiprocessing

    _, ids, _ = dataset
    before = set(multiprocessing.active_children())
    run = run_images_batched(job_for(dataset, tmp_path / "dev", DHRParams()), ids, workers=2, device="cpu", batch_size=2)
    first = next(run)
    started = set(multiprocessing.active_children()) - before
    run.close()
    assert first.status == "done" and len(started) == 2
    assert not any(p.is_alive() for p in started)


def test_a_dead_worker_stops_the_run_with_an_error(dataset, tmp_path):
    import multiprocessing
    import os
    import signal

    _, ids, _ = dataset
    before = set(multiprocessing.active_children())
    run = run_images_batched(job_for(dataset, tmp_path / "dev", DHRParams()), ids, workers=2, device="cpu", batch_size=2)
    next(run)
    workers = set(multiprocessing.active_children()) - before
    os.kill(next(iter(workers)).pid, signal.SIGKILL)  # out of memory, a crash
    with pytest.raises(RuntimeError, match=r"a CRF worker process died \(exit code -9\)"):
        list(run)
    assert not any(p.is_alive() for p in workers)


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------
def refine_cli(dataset, out, *extra):
    from typer.testing import CliRunner

    from dhr_label.cli import app

    directory = dataset[0]
    return CliRunner().invoke(app, [
        "refine", "--cams", str(directory / "cams.h5"), "--feats", str(directory / "feats.h5"), "--out", str(out), "--json", *extra,
    ])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_one_line(dataset, tmp_path):
    result = refine_cli(dataset, tmp_path / "out", "--device", "cuda")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: --device cuda: torch sees no CUDA device") and result.stdout == ""


def test_device_auto_takes_the_cpu_path_without_a_gpu(dataset, tmp_path):
    result = refine_cli(dataset, tmp_path / "out", "--device", "auto", "--workers", "1", "--limit", "2")
    assert result.exit_code == 0, result.stderr
    import json

    manifest = json.loads((tmp_path / "out" / "dhr-label-manifest.json").read_text())
    assert manifest["engine"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


def test_device_cuda_with_dask_is_a_usage_error(dataset, tmp_path):
    result = refine_cli(dataset, tmp_path / "out", "--device", "cuda", "--backend", "dask", "--scheduler", "tcp://127.0.0.1:8786")
    assert result.exit_code == 2
    assert "--device cuda runs its CRF workers on this machine" in result.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_cuda_masks_agree_with_the_cpu_path(dataset, tmp_path):
    _, ids, _ = dataset
    assert refine_cli(dataset, tmp_path / "cpu", "--workers", "1").exit_code == 0
    result = refine_cli(dataset, tmp_path / "cuda", "--device", "cuda", "--workers", "2")
    assert result.exit_code == 0, result.stderr
    a, b = masks(tmp_path / "cpu", ids), masks(tmp_path / "cuda", ids)
    assert sum(int((a[i] == b[i]).sum()) for i in ids) / sum(a[i].size for i in ids) >= AGREEMENT
