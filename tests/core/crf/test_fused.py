"""The fused Triton kernels (core/crf/fused.py, kernels.py) against the eager torch path.

On the CPU Triton's interpreter runs the kernels (tests/conftest.py sets TRITON_INTERPRET=1
before they are imported); with ``--device cuda`` they are compiled. The contract is bit for
bit: the same float32 operations in the same order as the eager path, so every comparison
below is ``torch.equal`` (tolerance 0), on generated scenes and on crops of the real CamVid
photos of examples/camvid.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton", reason="Triton is in the test extra; the fused kernels need it")

from dhr_label.core.crf import fused  # noqa: E402
from dhr_label.core.crf.meanfield import BatchCRF  # noqa: E402
from dhr_label.params import CRFKernels, CRFParams  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "camvid" / "cams.h5"
FEW = CRFParams(backend="torch", iterations=3)  # the interpreter is slow: most tests run 3 iterations
FULL = CRFParams(backend="torch")  # DHR's 10


@pytest.fixture(scope="module")
def runs_here(device):
    """Skip where this session cannot run the kernels on ``device`` (said why)."""
    status = fused.triton_status()
    if device.type == "cpu" and status is not fused.TritonStatus.interpreted:
        pytest.skip("the kernels run on CPU tensors only under TRITON_INTERPRET=1 (this session compiles them for CUDA)")
    if device.type == "cuda" and status is not fused.TritonStatus.compiled:
        pytest.skip("TRITON_INTERPRET=1 is set: the kernels are not compiled for CUDA in this session")
    return device


def _smooth(gen, shape, cell):
    c, h, w = shape
    low = torch.rand(1, c, max(2, h // cell), max(2, w // cell), generator=gen)
    return F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0]


def _probs(gen, c, h, w):
    """Channel values like CAMs: smooth fields, sharpened, plus noise, normalised."""
    p = _smooth(gen, (c, h, w), 6) ** 3 + 0.05 * torch.rand(c, h, w, generator=gen)
    return p / p.sum(dim=0, keepdim=True)


def _scene(h, w, c, seed):
    gen = torch.Generator().manual_seed(seed)
    colours = _smooth(gen, (3, h, w), 8) * 255 + torch.randn(3, h, w, generator=gen) * 6
    return colours.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous(), _probs(gen, c, h, w)


def _camvid_crops(count, size, seed):
    """Crops of the real CamVid photos shipped in examples/camvid, with generated channel values."""
    from dhr_label.io.contract import CamsFile

    gen = torch.Generator().manual_seed(seed)
    out = []
    with CamsFile.open(EXAMPLE) as cams:
        for k, image_id in enumerate(cams.ids()[:count]):
            photo = cams.read_image(image_id)
            top, left = 120 + 30 * k, 150 + 40 * k  # road, cars, buildings: edges in every crop
            crop = torch.from_numpy(np.ascontiguousarray(photo[top : top + size[0], left : left + size[1]]))
            out.append((crop, _probs(gen, 11 - 4 * k, *size)))
    return out


def _both(scenes, params, device, **fused_options):
    """Marginals of the eager path and of the fused kernels for the same batch."""
    images = [im.to(device) for im, _ in scenes]
    probs = [p.to(device) for _, p in scenes]
    eager = BatchCRF(images, params, kernels="eager").marginals(probs)
    crf = BatchCRF(images, params, kernels="triton")
    if fused_options:
        crf.fused = fused.FusedLattices(images, params, **fused_options)
    return eager, crf.marginals(probs)


def _assert_identical(eager, triton_q):
    for b, (a, q) in enumerate(zip(eager, triton_q)):
        assert q.shape == a.shape and q.dtype == torch.float32
        assert torch.equal(a, q), f"image {b}: max |dQ| {float((a - q).abs().max()):.3g}"


# ----------------------------------------------------------------------------------------------
# Bit for bit against the eager path
# ----------------------------------------------------------------------------------------------
def test_mixed_batch_is_the_eager_path_bit_for_bit(runs_here):
    # Sizes repeat (one Gaussian lattice per size, shared) and label counts cover every slot
    # layout part: packets in pairs, an odd last packet, a scalar tail, C <= 2 (alpha last),
    # a single label, and images with empty slots.
    scenes = [_scene(14, 19, 13, 1), _scene(14, 19, 2, 2), _scene(9, 12, 5, 3), _scene(14, 19, 1, 4), _scene(11, 7, 11, 5)]
    _assert_identical(*_both(scenes, FEW, runs_here))


def test_real_photo_crops_ten_iterations_bit_for_bit(runs_here):
    _assert_identical(*_both(_camvid_crops(2, (40, 56), seed=7), FULL, runs_here))


def test_zero_iterations_is_the_eager_softmax(runs_here):
    scenes = [_scene(8, 9, 7, 8), _scene(8, 9, 3, 9)]
    _assert_identical(*_both(scenes, CRFParams(backend="torch", iterations=0), runs_here))


def test_result_does_not_depend_on_batch_chunks_or_tiling(runs_here):
    scenes = [_scene(12, 15, 6, 10), _scene(10, 13, 6, 11), _scene(12, 15, 4, 12)]
    images = [im.to(runs_here) for im, _ in scenes]
    probs = [p.to(runs_here) for _, p in scenes]
    together = BatchCRF(images, FEW, kernels="triton").marginals(probs)
    alone = [BatchCRF([im], FEW, kernels="triton").marginals([p])[0] for im, p in zip(images, probs)]
    per_image = BatchCRF(images, FEW, kernels="triton")
    per_image.fused = fused.FusedLattices(images, FEW, chunk_pixels=1)  # one bilateral lattice per image
    device_tiling = BatchCRF(images, FEW, kernels="triton")
    device_tiling.fused = fused.FusedLattices(images, FEW, tiling="device")  # the GPU's block sizes
    again = BatchCRF(images, FEW, kernels="triton").marginals(probs)
    for other in (alone, per_image.marginals(probs), device_tiling.marginals(probs), again):
        _assert_identical(together, other)


def test_one_gaussian_lattice_per_image_size(runs_here):
    scenes = [_scene(10, 12, 3, s) for s in range(3)] + [_scene(12, 10, 3, 9)]
    crf = BatchCRF([im.to(runs_here) for im, _ in scenes], FEW, kernels="triton").fused
    # Two sizes: two Gaussian structures; the four images' bilateral lattices in one chunk.
    assert crf.structures == 3
    assert crf.n_gauss_instances == 4


def test_an_iteration_is_eight_launches(runs_here):
    scenes = [_scene(9, 11, 4, 13), _scene(9, 11, 12, 14)]
    images = [im.to(runs_here) for im, _ in scenes]
    crf = BatchCRF(images, FEW, kernels="triton")
    crf.fused = fused.FusedLattices(images, FEW, tiling="device")  # one splat launch, as on a GPU
    with fused.count_launches() as counts:
        crf.marginals([p.to(runs_here) for _, p in scenes])
    # First softmax, then per iteration: splat, 6 blur directions, slice + update + softmax.
    assert counts == {"update_kernel": 1 + FEW.iterations, "splat_kernel": FEW.iterations, "blur_kernel": 6 * FEW.iterations}


# ----------------------------------------------------------------------------------------------
# Choosing the kernels
# ----------------------------------------------------------------------------------------------
def test_auto_is_eager_on_the_cpu_and_triton_needs_a_runnable_triton(monkeypatch):
    assert fused.resolve_kernels("auto", "cpu") is CRFKernels.eager
    assert fused.resolve_kernels(CRFKernels.eager, "cpu") is CRFKernels.eager
    monkeypatch.setattr(fused, "triton_status", lambda: fused.TritonStatus.compiled)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        fused.resolve_kernels("triton", "cpu")
    monkeypatch.setattr(fused, "triton_status", lambda: fused.TritonStatus.missing)
    with pytest.raises(ValueError, match="need Triton"):
        fused.resolve_kernels("triton", "cpu")
    with pytest.raises(ValueError, match="auto, eager, triton"):
        CRFParams(kernels="fast")


def test_chunks_cover_the_images_in_order_within_the_limit():
    assert fused._chunks([5, 5, 5], 10) == [(0, 2), (2, 3)]
    assert fused._chunks([20, 3, 3], 10) == [(0, 1), (1, 3)]  # an image over the limit builds alone
    assert fused._chunks([4], 1) == [(0, 1)]


# ----------------------------------------------------------------------------------------------
# The device build: every specialisation compiles for sm_90 with exact arithmetic
# ----------------------------------------------------------------------------------------------
def test_kernels_compile_for_hopper_with_exact_arithmetic(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # a compile, not a cache hit
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    report = tmp_path / "compile.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_compile.py"), "--json", str(report)],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    import json

    rows = json.loads(report.read_text())["kernels"]
    assert {r["kernel"] for r in rows} == {"splat_kernel", "blur_kernel", "update_kernel"}
    for r in rows:
        assert r["fma"] == 0 and r["div_approx"] == 0 and r["spill_stores"] == 0, r
    assert all(r["div_rn_f32"] > 0 and r["round_constant"] >= 2 for r in rows if r["kernel"] == "update_kernel")
