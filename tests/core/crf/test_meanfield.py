"""The batched torch DenseCRF against pydensecrf, batch invariance, its softmax, validation."""
import ctypes
import ctypes.util
import dataclasses
import platform

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dhr_label.core.crf.meanfield import BatchCRF, dense_crf
from dhr_label.core.crf.softmax import glibc_expf, slot_layout, softmax_slots
from dhr_label.params import CRFParams

PARAMS = CRFParams()
# Through the wrapper the unaries differ in the last bit: numpy's float32 log is not correctly
# rounded (22 % of values differ from log in float64), ours is. Ten iterations near label
# boundaries amplify that: measured max |dQ| <= 5.7e-5 on 28 generated scenes (2-21 labels).
MARGINAL_ATOL = 1e-3
AGREEMENT_MIN = 0.995  # share of pixels with the same argmax (measured: 1.0)
# With the same unary every operation is pydensecrf's: bit for bit. This holds for the default
# pip build of pydensecrf2 on x86-64 (SSE2 code paths, glibc >= 2.28 expf), the one installed.
X86_64 = platform.machine() in ("x86_64", "AMD64")
needs_x86 = pytest.mark.skipif(not X86_64, reason="bit-exactness is for pydensecrf's x86-64 SSE build")
# numpy's float32 exp is not Eigen's: the wrapper's zero-iteration softmax may differ by an ulp.
SOFTMAX_ATOL = 1e-6
INDEX_FIELDS = ("splat_entry", "splat_pixel", "blur_index", "slice_index")  # int32 on CUDA, int64 on CPU


def _smooth(gen, shape, cell):
    """A smooth random field: low-resolution noise, bilinearly upsampled."""
    c, h, w = shape
    low = torch.rand(1, c, max(2, h // cell), max(2, w // cell), generator=gen)
    return F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0]


def _scene(h, w, c, seed):
    """An image with smooth colour regions and noise, and smooth noisy channel values in (0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    colours = _smooth(gen, (3, h, w), 8) * 255 + torch.randn(3, h, w, generator=gen) * 6
    image = colours.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous()
    probs = _smooth(gen, (c, h, w), 6) + 0.3 * torch.rand(c, h, w, generator=gen)
    return image, probs / probs.sum(dim=0, keepdim=True)


def _unary(probs):
    """The unary as the torch CRF computes it: float32 clip, log in float64 rounded once."""
    clip = torch.tensor(PARAMS.unary_clip, dtype=torch.float32)
    return -torch.log(torch.maximum(probs.float().cpu(), clip).double()).float()


def _dcrf():
    """pydensecrf, imported here: a machine without it (a GPU box) still runs the other tests."""
    return pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf is not installed (the reference of this test)")


def _wrapper(image, params=PARAMS):
    """The pydensecrf wrapper of dhr-label for ``image`` (imported lazily, as :func:`_dcrf`)."""
    _dcrf()
    from dhr_label.core.crf.pydense import PydenseCRF

    return PydenseCRF(image, params)


def _pydensecrf(image, unary, iterations=PARAMS.iterations):
    """pydensecrf on a given unary (C x H x W): DHR's kernels, the marginals C x H x W."""
    dcrf = _dcrf()
    c, h, w = unary.shape
    model = dcrf.DenseCRF2D(w, h, c)
    model.addPairwiseGaussian(sxy=PARAMS.gauss_sxy, compat=PARAMS.gauss_compat)
    rgb = np.ascontiguousarray(image.cpu().numpy())
    model.addPairwiseBilateral(sxy=PARAMS.bilateral_sxy, srgb=PARAMS.bilateral_srgb, rgbim=rgb, compat=PARAMS.bilateral_compat)
    model.setUnaryEnergy(np.ascontiguousarray(unary.reshape(c, -1).numpy()))
    return np.asarray(model.inference(iterations), dtype=np.float32).reshape(c, h, w)


# ----------------------------------------------------------------------------------------------
# pydensecrf
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("labels", [2, 3, 4, 5, 6])
def test_agrees_with_the_pydensecrf_wrapper(device, labels):
    image, probs = _scene(40, 56, labels, seed=labels)
    q = BatchCRF([image.to(device)], PARAMS).marginals([probs.to(device)])[0]
    assert q.device.type == device.type and q.dtype == torch.float32 and q.shape == probs.shape
    ref = _wrapper(image.numpy()).marginals(probs.numpy())
    q = q.cpu().numpy()
    assert (q.argmax(axis=0) == ref.argmax(axis=0)).mean() >= AGREEMENT_MIN
    assert np.abs(q - ref).max() <= MARGINAL_ATOL


@needs_x86
def test_mixed_batch_is_pydensecrf_bit_for_bit(device):
    """Sizes and label counts mixed: 1-2 labels (pydensecrf's 1-2 channel filter path), 3-21
    (SSE path; Eigen's packet/tail split of the softmax at 4, 8, 12, 20 labels)."""
    cases = [(30, 40, 3), (23, 31, 21), (30, 40, 2), (16, 20, 1), (21, 19, 11), (28, 36, 6), (14, 30, 8)]
    scenes = [_scene(h, w, c, seed=10 + i) for i, (h, w, c) in enumerate(cases)]
    crf = BatchCRF([image.to(device) for image, _ in scenes], PARAMS)
    marginals = crf.marginals([probs.to(device) for _, probs in scenes])
    for (image, probs), q in zip(scenes, marginals):
        ref = _pydensecrf(image, _unary(probs))
        assert np.array_equal(q.cpu().numpy(), ref), f"{tuple(probs.shape)}: max |dQ| {np.abs(q.cpu().numpy() - ref).max()}"


def test_an_image_alone_and_in_a_mixed_batch_is_bit_identical(device):
    scenes = [_scene(30, 40, 4, 1), _scene(17, 45, 9, 2), _scene(20, 20, 1, 3), _scene(24, 16, 21, 4)]
    batch = BatchCRF([image.to(device) for image, _ in scenes], PARAMS).marginals([p.to(device) for _, p in scenes])
    for (image, probs), q in zip(scenes, batch):
        alone = BatchCRF([image.to(device)], PARAMS).marginals([probs.to(device)])[0]
        assert torch.equal(alone, q)


def test_repeated_runs_and_both_filter_methods_are_bit_identical(device):
    scenes = [_scene(30, 41, 5, 5), _scene(22, 18, 2, 6)]
    images, probs = [i.to(device) for i, _ in scenes], [p.to(device) for _, p in scenes]
    crf = BatchCRF(images, PARAMS)
    first = crf.marginals(probs)
    again = crf.marginals(probs)
    other = BatchCRF(images, PARAMS, method="bags" if device.type != "cpu" else "segments").marginals(probs)
    for a, b, c in zip(first, again, other):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_both_index_widths_with_either_filter_give_the_same_marginals(device, index_dtype):
    """CUDA's path (int32 indices, segment sums) and the CPU's (int64, bags) on one device."""
    scenes = [_scene(26, 33, 6, 15), _scene(19, 21, 2, 16)]
    images, probs = [i.to(device) for i, _ in scenes], [p.to(device) for _, p in scenes]
    reference = BatchCRF(images, PARAMS).marginals(probs)
    for method in ("segments", "bags"):
        crf = BatchCRF(images, PARAMS, method=method)
        crf.lattices = tuple(
            dataclasses.replace(lat, **{name: getattr(lat, name).to(index_dtype) for name in INDEX_FIELDS})
            for lat in crf.lattices
        )
        for a, q in zip(reference, crf.marginals(probs)):
            assert torch.equal(a, q), method


def test_marginals_are_distributions_and_labels_their_argmax(device):
    image, probs = _scene(30, 40, 3, 7)
    crf = BatchCRF([image.to(device)], PARAMS)
    q = crf.marginals([probs.to(device)])[0]
    torch.testing.assert_close(q.sum(dim=0), torch.ones(30, 40, device=device), rtol=0, atol=1e-6)
    assert bool((q >= 0).all())
    labels = crf.labels([probs.to(device)])[0]
    assert labels.dtype == torch.int64 and torch.equal(labels, q.argmax(dim=0))


def test_the_crf_smooths_a_noisy_label_map(device):
    """Known answer: two flat colour halves with 35 % salt-and-pepper label noise; the CRF
    returns each half's majority label almost everywhere."""
    h, w = 30, 40
    image = torch.full((h, w, 3), 40, dtype=torch.uint8)
    image[:, w // 2 :] = 210
    truth = (torch.arange(w) >= w // 2).long().expand(h, w)
    gen = torch.Generator().manual_seed(8)
    noisy = torch.where(torch.rand(h, w, generator=gen) < 0.35, 1 - truth, truth)
    probs = torch.stack([(noisy == 0).float(), (noisy == 1).float()]) * 0.4 + 0.3
    labels = BatchCRF([image.to(device)], PARAMS).labels([probs.to(device)])[0].cpu()
    assert (noisy == truth).float().mean() < 0.7
    assert (labels == truth).float().mean() > 0.98


@needs_x86
def test_zero_iterations_is_the_softmax_of_minus_the_unary(device):
    params = CRFParams(iterations=0)
    image, probs = _scene(20, 30, 5, 9)
    q = BatchCRF([image.to(device)], params).marginals([probs.to(device)])[0].cpu()
    assert np.array_equal(q.numpy(), _pydensecrf(image, _unary(probs), iterations=0))
    wrapper = _wrapper(image.numpy(), params).marginals(probs.numpy())  # numpy's softmax
    assert np.abs(q.numpy() - wrapper).max() <= SOFTMAX_ATOL
    assert not np.array_equal(q.numpy(), BatchCRF([image], PARAMS).marginals([probs])[0].numpy())


# ----------------------------------------------------------------------------------------------
# The softmax: Eigen's exp and sum, glibc's expf, slots
# ----------------------------------------------------------------------------------------------
@needs_x86
@pytest.mark.parametrize("labels", list(range(1, 25)))
def test_softmax_is_eigens_expandnormalize_bit_for_bit(device, labels):
    gen = torch.Generator().manual_seed(labels)
    unary = torch.rand(labels, 3000, generator=gen) * 12
    unary[:, :50] *= 6  # far tails
    model = _dcrf().DenseCRF(3000, labels)  # no pairwise term: inference(0) is expAndNormalize(-U)
    model.setUnaryEnergy(np.ascontiguousarray(unary.numpy()))
    ref = np.asarray(model.inference(0), dtype=np.float32).reshape(labels, -1)
    layout = slot_layout([labels])
    slots = torch.tensor(layout.slots[0])
    logits = torch.zeros(3000, layout.n_slots)
    logits[:, slots] = -unary.T
    q = softmax_slots(logits.to(device), layout)[:, slots.to(device)].T.cpu().numpy()
    assert np.array_equal(q, ref)


def test_slot_layout_keeps_each_images_sums_whatever_the_batch(device):
    counts = [1, 3, 4, 7, 8, 11, 12, 21]
    layout = slot_layout(counts)
    assert [len(s) for s in layout.slots] == counts and not layout.dense
    gen = torch.Generator().manual_seed(11)
    rows, empty, blocks = [], [], []
    for c, slots in zip(counts, layout.slots):
        x = torch.randn(50, c, generator=gen) * 4
        blocks.append(x)
        full = torch.zeros(50, layout.n_slots)
        full[:, list(slots)] = x
        mask = torch.ones(50, layout.n_slots, dtype=torch.bool)
        mask[:, list(slots)] = False
        rows.append(full)
        empty.append(mask)
    q = softmax_slots(torch.cat(rows).to(device), layout, torch.cat(empty).to(device)).cpu()
    for b, (c, slots, x) in enumerate(zip(counts, layout.slots, blocks)):
        own = slot_layout([c])
        alone = torch.zeros(50, own.n_slots)
        alone[:, list(own.slots[0])] = x
        ref = softmax_slots(alone.to(device), own)[:, list(own.slots[0])].cpu()
        assert torch.equal(q[50 * b : 50 * (b + 1), list(slots)], ref), f"{c} labels"
        assert float(q[50 * b : 50 * (b + 1)][torch.cat(empty)[50 * b : 50 * (b + 1)]].abs().sum()) == 0.0


@pytest.mark.skipif(not X86_64 or ctypes.util.find_library("m") is None, reason="compares with glibc's expf on x86-64")
def test_expf_is_glibcs(device):
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.expf.restype, libm.expf.argtypes = ctypes.c_float, [ctypes.c_float]
    gen = torch.Generator().manual_seed(12)
    x = torch.cat([-torch.rand(20000, generator=gen) * 30, -torch.rand(2000, generator=gen) * 110, torch.tensor([0.0, -1e-30])])
    ref = np.array([libm.expf(float(v)) for v in x.numpy()], dtype=np.float32)
    assert np.array_equal(glibc_expf(x.to(device)).cpu().numpy(), ref)


# ----------------------------------------------------------------------------------------------
# dense_crf and validation
# ----------------------------------------------------------------------------------------------
def test_dense_crf_is_the_batch_crf(device):
    scenes = [_scene(20, 28, 4, 13), _scene(20, 28, 4, 14)]
    images = torch.stack([i for i, _ in scenes]).to(device)
    probs = torch.stack([p for _, p in scenes]).to(device)
    q = dense_crf(images, probs)
    assert q.shape == probs.shape and q.device == probs.device and q.dtype == torch.float32
    for b, ref in enumerate(BatchCRF(list(images), PARAMS).marginals(list(probs))):
        assert torch.equal(q[b], ref)


def test_invalid_inputs_are_refused_with_clear_messages(device):
    image = torch.zeros(6, 8, 3, dtype=torch.uint8, device=device)
    with pytest.raises(ValueError, match="at least one image"):
        BatchCRF([], PARAMS)
    with pytest.raises(ValueError, match=r"image 1: expected H x W x 3 uint8, found \(6, 8, 3\) torch.float32"):
        BatchCRF([image, image.float()], PARAMS)
    with pytest.raises(ValueError, match=r"image 0: expected H x W x 3 uint8, found \(6, 8\)"):
        BatchCRF([image[..., 0]], PARAMS)
    crf = BatchCRF([image, image[:5]], PARAMS)
    probs = torch.rand(2, 6, 8, device=device)
    with pytest.raises(ValueError, match="expected channel values for 2 images, found 1"):
        crf.marginals([probs])
    with pytest.raises(ValueError, match=r"probs\[1\]: expected C x 5 x 8 with C >= 1 \(image 1 is 5 x 8\), found \(2, 6, 8\)"):
        crf.marginals([probs, probs])
    with pytest.raises(ValueError, match=r"probs\[0\]: expected a floating dtype, found torch.int64"):
        crf.marginals([probs.long(), probs[:, :5]])
    with pytest.raises(TypeError, match=r"probs\[0\]: expected a torch.Tensor, found ndarray"):
        crf.marginals([probs.cpu().numpy(), probs[:, :5]])
    with pytest.raises(ValueError, match=r"probs: expected 1 x C x 6 x 8 \(the images'\), found \(1, 2, 5, 8\)"):
        dense_crf(image[None], probs[None, :, :5])
    with pytest.raises(ValueError, match=r"images: expected B x H x W x 3 uint8"):
        dense_crf(image[None].float(), probs[None])
    if device.type != "cpu":
        with pytest.raises(ValueError, match="one device"):
            dense_crf(image[None], probs[None].cpu())
