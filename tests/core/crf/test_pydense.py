"""The pydensecrf wrapper: width-first construction, (C, H, W) output, lattice reuse, 0 iterations."""
import numpy as np
import pytest

# The wrapper's own tests: on a machine without pydensecrf (a GPU box) the module is skipped.
dcrf = pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf is not installed")

from dhr_label.core.crf import pydense as crf_module  # noqa: E402
from dhr_label.core.crf.pydense import PydenseCRF as ImageCRF  # noqa: E402
from dhr_label.params import CRFParams  # noqa: E402

H, W = 5, 7  # non-square, so a swapped width/height cannot pass unnoticed


def _image() -> np.ndarray:
    """Dark left half (columns 0-2), bright right half (3-6)."""
    image = np.full((H, W, 3), 200, dtype=np.uint8)
    image[:, :3] = 30
    return image


def _left_favours_label_1(confidence: float = 0.95) -> np.ndarray:
    probs = np.empty((2, H, W), dtype=np.float32)
    probs[1] = np.where(np.arange(W) < 3, confidence, 1 - confidence)[None, :]
    probs[0] = 1 - probs[1]
    return probs


def test_built_width_first_and_output_is_channels_height_width(monkeypatch):
    calls = []
    real = dcrf.DenseCRF2D

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(crf_module.dcrf, "DenseCRF2D", spy)
    crf = ImageCRF(_image(), CRFParams())
    q = crf.marginals(_left_favours_label_1())
    assert calls == [(W, H, 2)]
    assert q.shape == (2, H, W) and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(axis=0), 1.0, atol=1e-5)  # mean-field marginals
    labels = crf.labels(_left_favours_label_1())
    assert labels.shape == (H, W)
    assert (labels[:, :3] == 1).all() and (labels[:, 3:] == 0).all()


def test_lattice_reuse_gives_the_same_output_as_a_fresh_object(monkeypatch):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    first = rng.uniform(0, 1, (3, H, W)).astype(np.float32)
    second = rng.uniform(0, 1, (3, H, W)).astype(np.float32)
    other_count = rng.uniform(0, 1, (4, H, W)).astype(np.float32)
    params = CRFParams()

    fresh_second = ImageCRF(image, params).marginals(second)
    fresh_first = ImageCRF(image, params).marginals(first)

    built = []
    real = dcrf.DenseCRF2D
    monkeypatch.setattr(crf_module.dcrf, "DenseCRF2D", lambda *a: built.append(a) or real(*a))
    reused = ImageCRF(image, params)
    reused.marginals(first)
    np.testing.assert_array_equal(reused.marginals(second), fresh_second)
    assert len(built) == 1  # the second call with 3 labels reused the lattice
    reused.marginals(other_count)  # a different label count builds its own
    np.testing.assert_array_equal(reused.marginals(first), fresh_first)
    assert [a[2] for a in built] == [3, 4, 3]


def test_zero_iterations_is_the_normalised_clipped_unary(monkeypatch):
    def no_lattice(*args):
        raise AssertionError("0 iterations must not build a DenseCRF")

    monkeypatch.setattr(crf_module.dcrf, "DenseCRF2D", no_lattice)
    crf = ImageCRF(_image(), CRFParams(iterations=0))
    probs = np.zeros((2, H, W), dtype=np.float32)
    probs[0] = 0.2
    probs[1] = 0.6
    probs[1, 0, 0] = 0.0  # clipped at 1e-5
    q = crf.marginals(probs)
    np.testing.assert_allclose(q[:, 1, 1], [0.25, 0.75], atol=1e-6)
    np.testing.assert_allclose(q[:, 0, 0], [0.2 / (0.2 + 1e-5), 1e-5 / (0.2 + 1e-5)], rtol=1e-5)
    expected = np.ones((H, W), dtype=np.int64)
    expected[0, 0] = 0
    np.testing.assert_array_equal(crf.labels(probs), expected)


def test_input_is_not_modified():
    probs = _left_favours_label_1()
    before = probs.copy()
    ImageCRF(_image(), CRFParams()).labels(probs)
    np.testing.assert_array_equal(probs, before)


@pytest.mark.parametrize(
    "image, match",
    [
        (np.zeros((H, W), dtype=np.uint8), "H x W x 3 uint8"),
        (np.zeros((H, W, 3), dtype=np.float32), "H x W x 3 uint8"),
    ],
)
def test_bad_image_is_refused(image, match):
    with pytest.raises(ValueError, match=match):
        ImageCRF(image, CRFParams())


def test_probs_of_another_size_are_refused():
    with pytest.raises(ValueError, match="7 x 5, the image is 5 x 7"):
        ImageCRF(_image(), CRFParams()).marginals(np.full((2, W, H), 0.5, dtype=np.float32))
