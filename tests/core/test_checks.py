"""The Python API refuses what the command line refuses, with the same words: ``refine`` and
``refine_batch`` check their arrays first (``core/checks.py``), numpy or torch alike."""
import numpy as np
import pytest

import dhr_label
from dhr_label import DHRParams, Prototypes, Steps
from dhr_label.core.checks import check_image_inputs, grid_problem, tags_problem

H, W = 24, 32


def scene(**changes):
    """A valid CamVid-like image (no background class): tags 0 (Sky) and 3, features at 1/4."""
    rng = np.random.default_rng(0)
    base = np.zeros((H, W), np.uint8)
    base[12:] = 3
    inputs = dict(
        cam=rng.random((2, 6, 8), dtype=np.float32), labels=np.array([0, 3]),
        image=rng.integers(0, 256, (H, W, 3), dtype=np.uint8), base=base, uss=rng.random((5, 6, 8), dtype=np.float32),
        wss=[rng.random((4, 6, 8), dtype=np.float32)], background=None,
    )
    return {**inputs, **changes}


PARAMS = DHRParams(steps=Steps.row(7))


@pytest.mark.parametrize("changes, message", [
    # the README's example on CamVid: background=0 where class 0 is Sky, a tag of this image
    ({"background": 0}, "labels: tags must not include the background id 0, found [0, 3] (background= is the dataset's "
                        "background class; a dataset without one, such as CamVid, takes background=None)"),
    ({"labels": np.array([0, 3, 5])}, "labels: expected 2 tags (one per cam channel), found 3"),  # was a raw IndexError
    ({"labels": np.array([3, 0])}, "labels: expected unique ascending tags, found [3, 0]"),
    ({"labels": np.array([0.0, 3.0])}, "labels: expected [K] integer class ids (K >= 1), found float64 [0.0, 3.0]"),
    ({"labels": np.array([0, 300])}, "labels: expected class ids in [0, 255), found [0, 300]"),
    ({"background": 255}, "background: expected None or a class id in [0, 255), found 255"),
    ({"image": np.zeros((H, W, 3), np.float32)}, "image: expected an RGB image [H, W, 3] of uint8, found float32 [24, 32, 3]"),
    ({"image": np.zeros((H, W), np.uint8)}, "image: expected an array [H, W, 3] with every size >= 1, found [24, 32]"),
    ({"base": np.zeros((H, W + 1), np.uint8)},
     "base: expected uint8 class ids [H, W] = [24, 32] (the image's size; 255 = ignore), found uint8 [24, 33]"),
    ({"base": np.zeros((H, W), np.int64)}, "base: expected uint8 class ids [H, W] = [24, 32]"),
    ({"cam": np.zeros((2, 6, 8), np.int32)}, "cam: expected float CAMs, found int32"),
    ({"cam": np.full((2, 6, 8), np.nan, np.float32)}, "cam: expected finite values, found NaN or Inf"),
    ({"cam": np.zeros((2, 8, 6), np.float32)}, "cam: a 8 x 6 map does not fit the aspect ratio of the 24 x 32 image"),
    ({"uss": None}, "uss: expected USS features [D, h, w] (Step 2 is switched on), found None"),
    ({"uss": np.zeros((5, 6, 8), np.int8)}, "uss: expected float features, found int8"),
    ({"wss": [np.zeros((4, 6, 8), np.float32), np.zeros((4, 2, 9), np.float32)]}, "wss[1]: a 2 x 9 map does not fit"),
    ({"wss": np.zeros((4, 6, 8), np.float32)}, "wss: expected a list of feature maps [D_l, h_l, w_l], found ndarray"),
])
def test_refine_refuses_what_the_cli_refuses(changes, message):
    with pytest.raises(ValueError) as error:
        dhr_label.refine_image(**scene(**changes), params=PARAMS)
    assert str(error.value).startswith(message)


def test_the_same_words_as_the_file_layer():
    # io/contract.py and io/inputs.py word their per-image errors with these two functions.
    assert tags_problem([1, 15], channels=2, num_classes=21, background=0) is None
    assert tags_problem([0, 15], channels=2, num_classes=21, background=0) == \
        "tags must not include the background id 0, found [0, 15]"
    assert tags_problem([15], channels=2, num_classes=21, background=0) == "expected 2 tags (one per cam channel), found 1"
    assert tags_problem([1, 21], channels=2, num_classes=21, background=0) == "expected class ids in [0, 21), found [1, 21]"
    assert grid_problem((6, 8), (24, 32)) is None and grid_problem((7, 8), (24, 32)) is None  # within one cell
    assert grid_problem((8, 8), (24, 32)).startswith("a 8 x 8 map does not fit the aspect ratio of the 24 x 32 image")


def test_valid_inputs_pass_and_lists_of_ints_are_tags():
    inputs = scene(labels=[0, 3])
    state = dhr_label.refine_image(**inputs, params=PARAMS)
    assert state.mask.shape == (H, W) and set(np.unique(state.mask)) <= {0, 3}


def test_prototypes_must_cover_the_tags_and_match_the_features():
    inputs = scene()
    few = Prototypes(uss=np.ones((3, 5), np.float32), wss=(np.ones((3, 4), np.float32),))  # classes 0-2: no 3
    with pytest.raises(ValueError, match=r"labels: expected class ids in \[0, 3\), found \[0, 3\]"):
        dhr_label.refine_image(**inputs, params=PARAMS, prototypes=few)
    other = Prototypes(uss=np.ones((11, 7), np.float32), wss=(np.ones((11, 4), np.float32),))
    with pytest.raises(ValueError, match=r"prototypes: the prototypes have dimensions \[7, 4\] \(USS, WSS layers\), "
                                         r"this image's features \[5, 4\]"):
        dhr_label.refine_image(**inputs, params=PARAMS, prototypes=other)
    unused = DHRParams(steps=Steps.row(7), prototype_weight=0.0)  # not blended: not checked
    dhr_label.refine_image(**inputs, params=unused, prototypes=few)


def test_refine_batch_names_the_image():
    torch = pytest.importorskip("torch")
    good, bad = scene(), scene(labels=np.array([3, 0]))
    tensors = {k: [torch.from_numpy(np.asarray(s[k])) for s in (good, bad)] for k in ("cam", "labels", "image", "base", "uss")}
    with pytest.raises(ValueError, match=r"^image 1: labels: expected unique ascending tags, found \[3, 0\]"):
        dhr_label.refine_batch(tensors["cam"], tensors["labels"], tensors["image"], bases=tensors["base"], uss=tensors["uss"],
                               wss=[[torch.from_numpy(good["wss"][0])]] * 2, background=None, params=PARAMS)
    with pytest.raises(ValueError, match=r"^images: expected one entry per image \(2\), found 1"):
        dhr_label.refine_batch(tensors["cam"], tensors["labels"], tensors["image"][:1], background=None, params=PARAMS)
    image = torch.from_numpy(good["image"]).float()
    with pytest.raises(ValueError, match=r"^image 0: image: expected an RGB image \[H, W, 3\] of uint8, found float32"):
        check_image_inputs(tensors["cam"][0], tensors["labels"][0], image=image, background=None,
                           params=DHRParams(steps=Steps.row(4)), where="image 0: ")
