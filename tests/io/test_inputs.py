"""What one image's inputs are made of (dhr_label.io.inputs): what each step reads, the directories
that win over the file's datasets, adapted inputs and their notes, and what is refused, naming the
image, the file or dataset, and expected vs found. Tiny files written with the test helpers."""
from __future__ import annotations

import numpy as np
import pytest
from helpers_h5 import write_cams, write_feats
from PIL import Image

from dhr_label.errors import FileLevelError, InputError
from dhr_label.io.contract import CamsFile, FeatsFile
from dhr_label.io.inputs import check_image_source, find_image, load_inputs, load_pooling_inputs

CLASSES = ["background", "cat", "dog", "bird"]
CAM = np.stack([np.full((2, 3), 0.5), np.full((2, 3), 2.0)]).astype(np.float32)  # both tags positive
IMAGE = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)  # 4 x 6 image: CAMs, features 2 x 3
BASE = np.array([[0, 1, 1, 3, 3, 255]] * 4, dtype=np.uint8)
USS = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3) + 1
LAYERS = {"C5": USS * 3, "C4": USS * 2}


def record(**changes) -> dict:
    """Image ``x``'s arrays, some replaced (or removed: None)."""
    found = {"cam": CAM, "labels": np.array([1, 3]), "base": BASE, "image": IMAGE, "uss": USS, "wss": LAYERS, **changes}
    return {k: v for k, v in found.items() if v is not None}


def files(directory, ignore_index: int = 255, **changes) -> tuple[CamsFile, FeatsFile]:
    """A cams and a feats file of image ``x`` (see :func:`record`) in ``directory``, opened: the
    caller closes them (``with c, f:``)."""
    directory.mkdir(parents=True, exist_ok=True)
    records = {"x": record(**changes)}
    write_cams(directory / "cams.h5", records, classes=CLASSES, background=0, ignore_index=ignore_index)
    write_feats(directory / "feats.h5", records)
    return CamsFile.open(directory / "cams.h5"), FeatsFile.open(directory / "feats.h5")


def png(directory, name: str, array: np.ndarray, mode: str | None = None):
    """Save ``array`` as ``directory/name`` (the directory made if needed)."""
    directory.mkdir(exist_ok=True)
    image = Image.fromarray(array) if mode is None else Image.fromarray(array, mode=mode)
    image.save(directory / name)
    return directory / name


def refused(call, source, *expected: str) -> None:
    with pytest.raises(InputError) as caught:
        call()
    assert (caught.value.image_id, caught.value.source) == ("x", str(source))
    for text in expected:
        assert text in caught.value.problem, (text, caught.value.problem)


# ----------------------------------------------------------------------------------------------
# What each step reads
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("uss, wss", [(False, False), (True, False), (False, True), (True, True)])
def test_features_are_read_only_for_the_steps_that_use_them(tmp_path, uss, wss):
    c, f = files(tmp_path)
    with c, f:
        got = load_inputs("x", c, f, uss=uss, wss=wss)
    assert got.image_id == "x" and got.labels.tolist() == [1, 3] and got.notes == []
    np.testing.assert_array_equal(got.cam, CAM)
    np.testing.assert_array_equal(got.image, IMAGE)
    np.testing.assert_array_equal(got.base, BASE)
    assert (got.uss is None) == (not uss) and (got.wss is None) == (not wss)
    if uss:
        np.testing.assert_array_equal(got.uss, USS)
    if wss:  # the layers in name order
        assert len(got.wss) == 2
        np.testing.assert_array_equal(got.wss[0], LAYERS["C4"])
        np.testing.assert_array_equal(got.wss[1], LAYERS["C5"])


def test_step_1_alone_needs_no_feats_file_and_steps_2_3_do(tmp_path):
    c, f = files(tmp_path)
    with c, f:
        assert load_inputs("x", c, None).uss is None
        for flags in ({"uss": True}, {"wss": True}):
            refused(lambda: load_inputs("x", c, None, **flags), "--feats", "Steps 2/3 need a feats file")


def test_the_features_are_not_opened_for_step_1(tmp_path):
    c, f = files(tmp_path, uss=None, wss=None)  # a feats file with nothing for x
    with c, f:
        assert load_inputs("x", c, f).uss is None
        refused(lambda: load_inputs("x", c, f, uss=True), f"{f.path}:/x/uss", "required dataset is missing")


# ----------------------------------------------------------------------------------------------
# Base masks
# ----------------------------------------------------------------------------------------------
def test_no_base_mask_is_noted_unless_one_is_required(tmp_path):
    c, f = files(tmp_path, base=None)
    with c, f:
        got = load_inputs("x", c, None)
        assert got.base is None and got.notes == ["no base mask: seed only (M_init = M_seed)"]
        refused(lambda: load_inputs("x", c, None, base_required=True), f"{c.path}:/x/base",
                "ablation row 1 outputs the base mask, and none was found")


def test_the_files_own_ignore_index_becomes_255(tmp_path):
    base = np.where(BASE == 255, 9, BASE).astype(np.uint8)
    c, f = files(tmp_path, ignore_index=9, base=base)
    with c, f:
        np.testing.assert_array_equal(load_inputs("x", c, f).base, BASE)
        pooled, _, _ = load_pooling_inputs("x", c, f, wss=False)
        np.testing.assert_array_equal(pooled, BASE)
        got = load_inputs("x", c, f, base_dir=png(tmp_path / "bases", "x.png", base).parent).base
        np.testing.assert_array_equal(got, BASE)


def test_a_base_mask_directory_wins_over_the_file(tmp_path):
    other = np.where(BASE == 1, 2, BASE).astype(np.uint8)
    bases = tmp_path / "bases"
    png(bases, "x.png", other)
    c, f = files(tmp_path)
    with c, f:
        np.testing.assert_array_equal(load_inputs("x", c, None, base_dir=bases).base, other)


def test_a_base_mask_directory_without_this_image_or_with_a_bad_mask(tmp_path):
    bases = tmp_path / "bases"
    png(bases, "y.png", BASE)
    c, f = files(tmp_path)
    with c, f:
        refused(lambda: load_inputs("x", c, None, base_dir=bases), bases, "no base mask x.png in this directory")
        rgb = png(bases, "x.png", IMAGE)
        refused(lambda: load_inputs("x", c, None, base_dir=bases), rgb,
                "cannot read the base mask: expected an 8-bit palette or grey-index PNG (mode P or L), found mode RGB")
        png(bases, "x.png", np.where(BASE == 3, 7, BASE).astype(np.uint8))
        refused(lambda: load_inputs("x", c, None, base_dir=bases), rgb, "expected class ids in [0, 4) or 255, found [7]")


def test_a_base_mask_of_another_size_blames_the_side_that_came_from_outside(tmp_path):
    c, f = files(tmp_path, base=BASE[:3])
    with c, f:  # both from the file: the mask is wrong for its image
        refused(lambda: load_inputs("x", c, None), f"{c.path}:/x/base",
                f"expected a 4 x 6 mask (the image's size, {c.path}:/x/image), found 3 x 6")
    c, f = files(tmp_path / "good")
    images = tmp_path / "images"
    big = png(images, "x.png", np.zeros((6, 9, 3), np.uint8))
    with c, f:  # --images given, the mask is the file's own: the image is the one that does not fit
        refused(lambda: load_inputs("x", c, None, images_dir=images), big,
                f"expected the size of the base mask {c.path}:/x/base, 4 x 6 (H x W), found 6 x 9")
        bases = tmp_path / "bases"
        png(bases, "x.png", BASE)
        refused(lambda: load_inputs("x", c, None, images_dir=images, base_dir=bases), bases / "x.png",
                f"expected a 6 x 9 mask (the image's size, {big}), found 4 x 6")


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------
def test_an_image_directory_wins_over_the_file(tmp_path):
    other = 255 - IMAGE
    images = tmp_path / "images"
    png(images, "x.png", other)
    c, f = files(tmp_path)
    with c, f:
        got = load_inputs("x", c, None, images_dir=images)
    np.testing.assert_array_equal(got.image, other)
    assert got.notes == []


def test_an_image_found_nowhere(tmp_path):
    images = tmp_path / "images"
    png(images, "y.png", IMAGE)
    c, f = files(tmp_path, image=None)
    with c, f:
        refused(lambda: load_inputs("x", c, None), f"{c.path}:/x/image", "no image in the file and no --images directory given")
        refused(lambda: load_inputs("x", c, None, images_dir=images), images, "no image x.jpg|.jpeg|.png in this directory")


def test_an_image_file_that_cannot_be_decoded(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    c, f = files(tmp_path)
    with c, f:
        refused(lambda: load_inputs("x", c, None, images_dir=images), images / "x.png", "cannot decode the image: ")


GREY = IMAGE[:, :, 0]
ADAPTED = {  # an image file -> what is read, the note
    "grey": (lambda d: png(d, "x.png", GREY), np.repeat(GREY[:, :, None], 3, axis=2), "image x.png: grey copied to R, G, B"),
    "RGBA": (lambda d: png(d, "x.png", np.concatenate([IMAGE, np.full((4, 6, 1), 9, np.uint8)], axis=2)), IMAGE,
             "image x.png: RGBA: alpha dropped"),
    "16-bit grey": (lambda d: png(d, "x.png", GREY.astype(np.uint16) * 257), np.repeat(GREY[:, :, None], 3, axis=2),
                    "image x.png: 16-bit values scaled to 8 bits, grey copied to R, G, B"),
    "palette": (lambda d: _palette(d), np.stack([GREY, 255 - GREY, np.full_like(GREY, 7)], axis=2),
                "image x.png: mode P converted to RGB"),
}


def _palette(directory):
    image = Image.fromarray(GREY, mode="P")
    image.putpalette([v for i in range(256) for v in (i, 255 - i, 7)])
    directory.mkdir(exist_ok=True)
    image.save(directory / "x.png")


@pytest.mark.parametrize("make, expected, note", ADAPTED.values(), ids=ADAPTED.keys())
def test_image_files_in_other_modes_are_converted_and_noted(tmp_path, make, expected, note):
    make(tmp_path / "images")
    c, f = files(tmp_path)
    with c, f:
        got = load_inputs("x", c, None, images_dir=tmp_path / "images")
    assert got.image.dtype == np.uint8 and got.image.flags.writeable
    np.testing.assert_array_equal(got.image, expected)
    assert got.notes == [note]


def test_a_converted_image_in_the_file_is_noted(tmp_path):
    c, f = files(tmp_path, image=np.concatenate([IMAGE, np.zeros((4, 6, 1), np.uint8)], axis=2))
    with c, f:
        got = load_inputs("x", c, None)
    np.testing.assert_array_equal(got.image, IMAGE)
    assert got.notes == ["image: RGBA: alpha dropped"]


def test_find_image_tries_the_suffixes_in_order(tmp_path):
    assert find_image(tmp_path, "x") is None
    (tmp_path / "x.jpg").mkdir()  # a directory is not an image
    assert find_image(tmp_path, "x") is None
    found = []
    for name in ("x.PNG", "x.JPEG", "x.JPG", "x.png", "x.jpeg"):  # from the last tried to the first
        (tmp_path / name).write_bytes(b"")
        found.append(find_image(tmp_path, "x").name)
    assert found == ["x.PNG", "x.JPEG", "x.JPG", "x.png", "x.jpeg"]  # each new one tried earlier
    (tmp_path / "x.jpg").rmdir()
    (tmp_path / "x.jpg").write_bytes(b"")
    assert find_image(tmp_path, "x") == tmp_path / "x.jpg"
    assert find_image(tmp_path, "x.") is None and find_image(tmp_path, "X") is None


# ----------------------------------------------------------------------------------------------
# Features: adapted, and fitted to the image
# ----------------------------------------------------------------------------------------------
def test_float64_features_and_nan_cells_are_adapted_and_noted(tmp_path):
    layer = LAYERS["C4"].copy()
    layer[1, 1, 2] = np.nan
    cam = CAM.copy()
    cam[0] = -1  # tag 1 never positive
    c, f = files(tmp_path, cam=cam, uss=USS.astype(np.float64), wss={"C4": layer})
    with c, f:
        got = load_inputs("x", c, f, uss=True, wss=True)
    assert got.notes == ["cam: tag(s) [1] never positive: no seed for them", "uss: float64 read as float32",
                         "wss/C4: 1 of 6 cells held NaN/Inf and were zeroed"]
    assert got.uss.dtype == np.float32 and (got.wss[0][:, 1, 2] == 0).all()
    np.testing.assert_array_equal(got.wss[0][:, :, :2], LAYERS["C4"][:, :, :2])


WRONG_GRID = np.ones((2, 4, 2), np.float32)  # 4 x 2 does not fit a 4 x 6 image
GRID_FAULTS = {
    "cam": ({"cam": np.ones((2, 4, 2), np.float32)}, "cam"),
    "uss": ({"uss": WRONG_GRID}, "uss"),
    "a wss layer": ({"wss": {"C4": USS, "C5": WRONG_GRID}}, "wss/C5"),
    "one wss dataset": ({"wss": WRONG_GRID}, "wss"),
}


@pytest.mark.parametrize("changes, dataset", GRID_FAULTS.values(), ids=GRID_FAULTS.keys())
def test_a_map_that_does_not_fit_the_image_names_its_dataset(tmp_path, changes, dataset):
    c, f = files(tmp_path, **changes)
    with c, f:
        where = c.path if dataset == "cam" else f.path
        refused(lambda: load_inputs("x", c, f, uss=True, wss=True), f"{where}:/x/{dataset}",
                "a 4 x 2 map does not fit the aspect ratio of the 4 x 6 image (expected h/w = 0.667 within one cell)")


# ----------------------------------------------------------------------------------------------
# The class-prototype pass
# ----------------------------------------------------------------------------------------------
def test_pooling_reads_the_base_mask_and_features_only(tmp_path):
    c, f = files(tmp_path, cam=np.zeros((1, 1, 1), np.float32), image=None)  # neither is read
    with c, f:
        base, uss, wss = load_pooling_inputs("x", c, f, wss=False)
        np.testing.assert_array_equal(base, BASE)
        np.testing.assert_array_equal(uss, USS)
        assert wss is None
        _, _, layers = load_pooling_inputs("x", c, f, wss=True)
        np.testing.assert_array_equal(np.stack(layers), np.stack([LAYERS["C4"], LAYERS["C5"]]))
        other = np.where(BASE == 1, 2, BASE).astype(np.uint8)
        base, _, _ = load_pooling_inputs("x", c, f, wss=False, base_dir=png(tmp_path / "bases", "x.png", other).parent)
        np.testing.assert_array_equal(base, other)


def test_pooling_without_a_base_mask_reads_nothing_else(tmp_path):
    c, f = files(tmp_path, base=None, uss=None, wss=None)  # no features either: they are not read
    with c, f:
        assert load_pooling_inputs("x", c, f, wss=True) == (None, None, None)


def test_pooling_features_must_fit_the_base_mask(tmp_path):
    c, f = files(tmp_path, wss={"C4": WRONG_GRID})
    with c, f:
        assert load_pooling_inputs("x", c, f, wss=False)[1] is not None
        refused(lambda: load_pooling_inputs("x", c, f, wss=True), f"{f.path}:/x/wss", "a 4 x 2 map does not fit")
    c, f = files(tmp_path / "uss", uss=WRONG_GRID)
    with c, f:
        refused(lambda: load_pooling_inputs("x", c, f, wss=False), f"{f.path}:/x/uss", "a 4 x 2 map does not fit")


# ----------------------------------------------------------------------------------------------
# Whether the selected images have images at all
# ----------------------------------------------------------------------------------------------
def test_no_image_for_any_selected_id_is_one_file_level_error(tmp_path):
    records = {"a": record(image=None), "b": record(image=None)}
    write_cams(tmp_path / "cams.h5", records, classes=CLASSES, background=0)
    images = tmp_path / "images"
    png(images, "c.png", IMAGE)
    with CamsFile.open(tmp_path / "cams.h5") as c:
        with pytest.raises(FileLevelError) as caught:
            check_image_source(c, ["a", "b"], None)
        assert str(caught.value) == (f"no image for any of the 2 selected ids (first: a): the cams file {c.path} holds "
                                     "no image dataset for them and no --images DIR was given; the DenseCRF needs "
                                     "the images: give --images DIR")
        with pytest.raises(FileLevelError) as caught:
            check_image_source(c, ["a", "b"], images)
        assert f"(first: a): the --images directory {images} holds no <id>.jpg|.jpeg|.png of them;" in str(caught.value)
        png(images, "b.png", IMAGE)
        assert check_image_source(c, ["a", "b"], images) is None  # one is enough
        assert check_image_source(c, [], None) is None


def test_one_image_in_the_file_is_enough(tmp_path):
    c, f = files(tmp_path)
    with c, f:
        assert check_image_source(c, ["x"], None) is None
