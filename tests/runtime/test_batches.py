"""The batches executor (runtime/refine/batches.py) on any ``--device``: batches by pixel budget,
readers ahead, writers behind, failures isolated, out-of-memory halving with the failed batch
freed first, a lost device stopping the run, determinism."""
from __future__ import annotations

import json
import weakref
from pathlib import Path

import numpy as np
import pytest
from helpers_bench import make_inputs
from helpers_h5 import masks_in, pixels_in
from PIL import Image

torch = pytest.importorskip("torch")

from dhr_label.core import stages as stages_module  # noqa: E402
from dhr_label.io.contract import CamsFile  # noqa: E402
from dhr_label.params import CRFBackend, CRFParams, DHRParams, Steps  # noqa: E402
from dhr_label.presets import preset_from_classes  # noqa: E402
from dhr_label.runtime.outcomes import DONE, FAILED, MaskTarget  # noqa: E402
from dhr_label.runtime.refine.batches import DeviceFailure, run_batches  # noqa: E402
from dhr_label.runtime.refine.images import RefineJob, run_images  # noqa: E402

AGREEMENT = 0.995  # the torch CRF against pydensecrf, end to end (the contract, README)
SMALL_BATCH = 3 * 48 * 64  # pixels: about three generated images a batch


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data")
    ids = make_inputs().generate(directory, 8, scale="tiny", seed=21)
    with CamsFile.open(directory / "cams.h5") as cams:
        preset = preset_from_classes(cams.classes, cams.background)
    return directory, ids, preset


@pytest.fixture
def usual(device) -> DHRParams:
    """The default parameters with the CRF a run on ``device`` has: pydensecrf on the CPU, the torch
    CRF on a GPU (whose machines may have no pydensecrf at all)."""
    return DHRParams(crf=CRFParams(backend=CRFBackend.torch if device.type == "cuda" else CRFBackend.pydensecrf))


def job_for(dataset, out: Path, params: DHRParams = DHRParams()) -> RefineJob:
    directory, _, preset = dataset
    out.mkdir(parents=True, exist_ok=True)
    target = MaskTarget(out, preset.palette, "t0ken", "provenance")
    return RefineJob(directory / "cams.h5", directory / "feats.h5" if params.steps.needs_features else None, params,
                     preset.background, target)


def on_device(job, ids, device, **options):
    options.setdefault("readers", 1)
    options.setdefault("batch_pixels", SMALL_BATCH)
    return {r.image_id: r for r in run_batches(job, ids, device=device, **options)}


@pytest.mark.parametrize("steps", [Steps.row(7), Steps.row(4), Steps.row(1)], ids=["row7", "row4", "row1"])
def test_batches_write_the_cpu_executors_masks(dataset, tmp_path, device, usual, steps):
    # The same CRF on both sides, so the executors are the difference (on a GPU: the torch CRF on
    # the CPU against the device's, which must agree bit for bit).
    _, ids, _ = dataset
    params = usual.replace(steps=steps)
    cpu = {r.image_id: r for r in run_images(job_for(dataset, tmp_path / "cpu", params), ids, workers=1)}
    dev = on_device(job_for(dataset, tmp_path / "dev", params), ids, device)
    assert sorted(dev) == sorted(ids) and all(r.status == DONE for r in dev.values()), [r.reason for r in dev.values()]
    assert masks_in(tmp_path / "dev") == masks_in(tmp_path / "cpu")  # the same bytes
    assert {i: r.restored for i, r in dev.items()} == {i: r.restored for i, r in cpu.items()}
    stages = {"seed_scores", "seed_mask"} if params.steps.init else set()
    assert all({"read", "write"} | stages <= set(r.timings) for r in dev.values())


def test_masks_do_not_depend_on_readers_or_batch_size(dataset, tmp_path, device):
    ids = dataset[1][:4]
    params = DHRParams(crf=CRFParams(backend=CRFBackend.torch))
    runs = {}
    for name, options in {"one": dict(readers=1, batch_pixels=1), "three": dict(readers=2, batch_pixels=SMALL_BATCH),
                          "all": dict(readers=2, batch_pixels=1 << 30)}.items():
        results = on_device(job_for(dataset, tmp_path / name, params), ids, device, **options)
        assert all(r.status == DONE for r in results.values())
        runs[name] = masks_in(tmp_path / name)
    assert runs["one"] == runs["three"] == runs["all"]


def test_the_torch_crf_agrees_with_pydensecrf_end_to_end(dataset, tmp_path, device):
    pytest.importorskip("pydensecrf")  # the reference: absent on a GPU box
    _, ids, _ = dataset
    on_device(job_for(dataset, tmp_path / "torch", DHRParams(crf=CRFParams(backend=CRFBackend.torch))), ids, device)
    list(run_images(job_for(dataset, tmp_path / "cpu"), ids, workers=1))
    a, b = pixels_in(tmp_path / "torch"), pixels_in(tmp_path / "cpu")
    same = sum(int((np.frombuffer(a[i], np.uint8) == np.frombuffer(b[i], np.uint8)).sum()) for i in ids)
    total = sum(len(a[i]) for i in ids)
    assert same / total >= AGREEMENT


def test_a_bad_image_fails_alone_with_the_cpu_executors_reason(dataset, tmp_path, device, usual):
    _, ids, _ = dataset
    wanted = [ids[0], "no_such_image", ids[1]]
    cpu = {r.image_id: r for r in run_images(job_for(dataset, tmp_path / "cpu", usual), wanted, workers=1)}
    dev = on_device(job_for(dataset, tmp_path / "dev", usual), wanted, device)
    assert dev["no_such_image"].status == FAILED and dev["no_such_image"].reason == cpu["no_such_image"].reason
    assert dev[ids[0]].status == dev[ids[1]].status == DONE
    assert not (tmp_path / "dev" / "no_such_image.png").exists()


def test_an_image_the_device_cannot_take_fails_alone(dataset, tmp_path, device, usual, monkeypatch):
    _, ids, _ = dataset
    with CamsFile.open(dataset[0] / "cams.h5") as cams:
        bad_cam, _ = cams.read_cam(ids[2])
    real = stages_module.run_stages

    def failing(states, params, **kwargs):  # stands for a device error on one image of the batch
        if any(np.array_equal(s.cam.cpu().numpy(), bad_cam) for s in states):
            raise ValueError("device maths failed")
        return real(states, params, **kwargs)

    monkeypatch.setattr(stages_module, "run_stages", failing)
    results = on_device(job_for(dataset, tmp_path / "dev", usual), ids, device, batch_pixels=1 << 30)
    assert results[ids[2]].status == FAILED
    assert results[ids[2]].reason.startswith("internal error ValueError: device maths failed")
    assert all(results[i].status == DONE for i in ids if i != ids[2])


def test_out_of_memory_halves_the_batch_and_changes_no_mask(dataset, tmp_path, device, usual, monkeypatch):
    _, ids, _ = dataset
    on_device(job_for(dataset, tmp_path / "plain", usual), ids, device, batch_pixels=1 << 30)
    real, sizes = stages_module.run_stages, []

    def small_memory(states, params, **kwargs):  # a device that holds two images at most
        sizes.append(len(states))
        if len(states) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(states, params, **kwargs)

    monkeypatch.setattr(stages_module, "run_stages", small_memory)
    results = on_device(job_for(dataset, tmp_path / "halved", usual), ids, device, batch_pixels=1 << 30)
    assert all(r.status == DONE for r in results.values())
    assert sizes == [8, 4, 2, 2, 4, 2, 2]  # halved, down to what fits, each half in turn
    assert masks_in(tmp_path / "halved") == masks_in(tmp_path / "plain")


def test_the_failed_batch_is_freed_before_the_retry(dataset, tmp_path, device, usual, monkeypatch):
    # A retry inside the handler of the error keeps the traceback, and with it the failed batch's
    # tensors: the device's memory is not given back and the halving cascades down to one image.
    _, ids, _ = dataset
    real, failed_batch, still_alive = stages_module.run_stages, [], []

    def out_of_memory_once(states, params, **kwargs):
        if not failed_batch:  # the first (whole) batch: it holds memory, then fails
            scratch = torch.empty(1 << 20)
            failed_batch.extend([weakref.ref(scratch)] + [weakref.ref(s.cam) for s in states])
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        still_alive.append(sum(ref() is not None for ref in failed_batch))  # at each retry
        return real(states, params, **kwargs)

    monkeypatch.setattr(stages_module, "run_stages", out_of_memory_once)
    results = on_device(job_for(dataset, tmp_path / "dev", usual), ids, device, batch_pixels=1 << 30)
    assert len(failed_batch) == 1 + len(ids) and all(r.status == DONE for r in results.values())
    assert still_alive == [0, 0]  # both halves ran with nothing of the failed batch left


def test_a_lost_device_stops_the_run_with_one_message(dataset, tmp_path, device, monkeypatch):
    # CUDA's sticky errors leave the context unusable: retrying image by image would fail every
    # remaining image in turn.
    _, ids, _ = dataset
    calls = []

    def lost(states, params, **kwargs):
        calls.append(len(states))
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nCompile with TORCH_USE_CUDA_DSA")

    monkeypatch.setattr(stages_module, "run_stages", lost)
    with pytest.raises(DeviceFailure, match=r"the device failed while refining .* \(CUDA error: an illegal memory access"):
        on_device(job_for(dataset, tmp_path / "dev"), ids, device, batch_pixels=1 << 30)
    assert calls == [len(ids)]  # no retry
    # Through the run: it stops, the manifest says so, and the exit code is 1.
    from dhr_label.runtime.refine import RefineRequest, run_refine

    directory, _, preset = dataset
    report = run_refine(RefineRequest(cams=directory / "cams.h5", feats=directory / "feats.h5", out=tmp_path / "run",
                                      params=DHRParams(), preset=preset, workers=1, device="cpu", executor="batches"))
    manifest = json.loads((tmp_path / "run" / "dhr-label-manifest.json").read_text())
    assert report.exit_code == 1 and "illegal memory access" in report.error and report.counts["failed"] == 0
    assert manifest["runs"][-1]["status"] == "stopped" and "illegal memory access" in manifest["runs"][-1]["error"]


def test_an_image_that_does_not_fit_alone_fails_alone(dataset, tmp_path, device, usual, monkeypatch):
    _, ids, _ = dataset
    real = stages_module.run_stages
    huge = ids[3]
    with CamsFile.open(dataset[0] / "cams.h5") as cams:
        huge_cam, _ = cams.read_cam(huge)

    def tight(states, params, **kwargs):
        if any(np.array_equal(s.cam.cpu().numpy(), huge_cam) for s in states):
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(states, params, **kwargs)

    monkeypatch.setattr(stages_module, "run_stages", tight)
    results = on_device(job_for(dataset, tmp_path / "dev", usual), ids, device, batch_pixels=1 << 30)
    assert results[huge].status == FAILED
    assert "the device ran out of memory for this image alone" in results[huge].reason
    assert all(results[i].status == DONE for i in ids if i != huge)


def test_closing_early_stops_the_work(dataset, tmp_path, device, usual):
    _, ids, _ = dataset
    out = tmp_path / "dev"
    run = run_batches(job_for(dataset, out, usual), ids, device=device, readers=2, batch_pixels=1)
    first = next(run)
    run.close()
    written = masks_in(out)
    assert first.status == DONE and 1 <= len(written) < len(ids)
    assert masks_in(out) == written and not any(p.name.endswith(".dhr-tmp") for p in out.iterdir())


def test_mask_files_are_class_ids_of_the_image_size(dataset, tmp_path, device, usual):
    _, ids, preset = dataset
    on_device(job_for(dataset, tmp_path / "dev", usual), ids[:2], device)
    for image_id in ids[:2]:
        with Image.open(tmp_path / "dev" / f"{image_id}.png") as mask:
            assert mask.mode == "P" and np.asarray(mask).max() < preset.num_classes
