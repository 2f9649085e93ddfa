"""``dhr-label show``: panel size, overlays, legends, missing masks, the HTML index."""
import h5py
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dhr_label import visual
from dhr_label.cli import app
from dhr_label.io.masks import write_mask
from dhr_label.presets import PRESETS, classes_json

runner = CliRunner()
VOC = PRESETS["voc"]
H, W = 80, 400  # wide enough for every legend to fit one line
PERSON, PLANE = 15, 1


def gt_mask():
    mask = np.zeros((H, W), np.uint8)
    mask[20:60, 30:90] = PERSON
    return mask


def setup(tmp_path):
    rng = np.random.default_rng(1)
    images, good, bad, gt = (tmp_path / n for n in ("images", "good", "bad", "gt"))
    for d in (images, good, bad, gt):
        d.mkdir()
    for image_id in ("x", "y"):
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(images / f"{image_id}.png")
        write_mask(gt / f"{image_id}.png", gt_mask(), VOC.palette)
        write_mask(good / f"{image_id}.png", gt_mask(), VOC.palette)
    wrong = gt_mask()
    wrong[20:60, 30:60] = PLANE
    write_mask(bad / "x.png", wrong, VOC.palette)  # "bad" has x only, and x half wrong
    return images, good, bad, gt


def show(*args):
    return runner.invoke(app, ["show", *map(str, args)])


def test_panels_have_the_expected_size_overlays_and_legends(tmp_path):
    images, good, bad, gt = setup(tmp_path)
    out = tmp_path / "panels"
    result = show("--images", images, "--masks", good, "--masks", bad, "--gt", gt, "--out", out)
    assert result.exit_code == 0, result.stderr
    assert "wrote 2 panels" in result.stderr and result.stdout == ""  # a summary, not a result
    panel = np.asarray(Image.open(out / "x.png").convert("RGB"))
    pad, caption = visual.PAD, visual.TEXT_SIZE + 2 * visual.PAD
    legend = max(visual.SWATCH, visual.TEXT_SIZE) + visual.PAD + visual.PAD  # one legend line
    # four tiles: image, good, bad, GT
    assert panel.shape == (caption + H + legend + 2 * pad, 4 * W + 5 * pad, 3)

    image = np.asarray(Image.open(images / "x.png").convert("RGB")).astype(float)
    tile = lambda i: panel[caption:caption + H, pad + i * (W + pad):pad + i * (W + pad) + W]  # noqa: E731
    assert (tile(0) == image).all()
    person = np.array(VOC.colour(PERSON), float)
    expected = np.clip((1 - visual.OVERLAY_ALPHA) * image[40, 40] + visual.OVERLAY_ALPHA * person + 0.5, 0, 255)
    assert (tile(1)[40, 40] == expected.astype(np.uint8)).all()

    legends = panel[caption + H:]
    column = lambda i: legends[:, pad + i * (W + pad):pad + i * (W + pad) + W].reshape(-1, 3)  # noqa: E731
    colours = lambda i: {tuple(c) for c in column(i)}  # noqa: E731
    assert VOC.colour(PERSON) in colours(1) and VOC.colour(0) in colours(1)
    assert VOC.colour(PLANE) not in colours(1)  # good has no aeroplane: not in its legend
    assert VOC.colour(PLANE) in colours(2)  # bad has
    assert colours(0) == {(255, 255, 255)}  # the image tile has no legend


def test_index_is_worst_first_and_missing_masks_are_grey(tmp_path):
    images, good, bad, gt = setup(tmp_path)
    out = tmp_path / "panels"
    result = show("--images", images, "--masks", bad, "--masks", good, "--gt", gt, "--out", out)
    assert result.exit_code == 0, result.stderr
    assert "1 images have no mask in bad" in result.stderr and "y" in result.stderr
    page = (out / "index.html").read_text()
    # sorted by the first set (bad): x is half wrong, y has no mask (unknown: last)
    assert page.index('id="x"') < page.index('id="y"')
    assert "worst first" in page
    panel = np.asarray(Image.open(out / "y.png").convert("RGB"))
    pad, caption = visual.PAD, visual.TEXT_SIZE + 2 * visual.PAD
    grey = panel[caption:caption + H, 2 * pad + W:2 * pad + 2 * W]
    assert (grey == 200).all()


def test_order_by_score(tmp_path):
    images, good, bad, gt = setup(tmp_path)
    worse = tmp_path / "worse"
    worse.mkdir()
    for image_id, wrong_cols in (("x", 10), ("y", 40)):
        mask = gt_mask()
        mask[20:60, 30:30 + wrong_cols] = PLANE
        write_mask(worse / f"{image_id}.png", mask, VOC.palette)
    out = tmp_path / "panels"
    assert show("--images", images, "--masks", worse, "--gt", gt, "--out", out).exit_code == 0
    page = (out / "index.html").read_text()
    assert page.index('id="y"') < page.index('id="x"')  # y is worse


def test_images_come_from_cams_when_no_directory(tmp_path):
    _, good, _, _ = setup(tmp_path)
    picture = np.random.default_rng(5).integers(0, 256, (H, W, 3), dtype=np.uint8)
    cams = tmp_path / "cams.h5"
    with h5py.File(cams, "w") as f:
        f.attrs.update(format="dhr-label/cams", version=1, classes=classes_json(VOC), background=0,
                       ignore_index=255)
        for image_id in ("x", "y"):
            f[f"{image_id}/image"] = picture
    out = tmp_path / "panels"
    result = show("--cams", cams, "--masks", good, "--out", out)
    assert result.exit_code == 0, result.stderr
    panel = np.asarray(Image.open(out / "x.png").convert("RGB"))
    caption = visual.TEXT_SIZE + 2 * visual.PAD
    assert (panel[caption:caption + H, visual.PAD:visual.PAD + W] == picture).all()
    assert "in id order" in (out / "index.html").read_text()


def test_no_image_source_is_a_usage_error(tmp_path):
    _, good, _, _ = setup(tmp_path)
    result = show("--masks", good, "--out", tmp_path / "p")
    assert result.exit_code == 2 and result.stdout == ""


def test_mask_of_the_wrong_size_fails_that_image(tmp_path):
    images, good, _, _ = setup(tmp_path)
    write_mask(good / "y.png", np.zeros((H, W + 1), np.uint8), VOC.palette)
    out = tmp_path / "panels"
    result = show("--images", images, "--masks", good, "--out", out)
    assert result.exit_code == 1
    assert "y: " in result.stderr and "80 x 401" in result.stderr and "80 x 400" in result.stderr
    assert (out / "x.png").is_file() and not (out / "y.png").exists()


def test_large_images_are_scaled_to_the_tile_width(tmp_path):
    images, good, _, _ = setup(tmp_path)
    out = tmp_path / "panels"
    assert show("--images", images, "--masks", good, "--out", out, "--tile-width", "64").exit_code == 0
    width = Image.open(out / "x.png").size[0]
    assert width == 2 * 64 + 3 * visual.PAD


def test_overlay_and_legend_entries():
    image = np.full((1, 3, 3), 100, np.uint8)
    mask = np.array([[0, 255, 40]], np.uint8)
    out = visual.overlay(image, mask, VOC.palette, alpha=0.5)
    assert out[0, 0].tolist() == [50, 50, 50]  # background is black in the VOC map
    assert out[0, 1].tolist() == [178, 178, 178]  # ignore tinted white: (100 + 255) / 2 rounded
    assert [label for _, label in visual.legend_entries(mask, VOC.classes)] == [
        "background", "id 40 (no class)", "ignore"]
    with pytest.raises(ValueError, match="1 x 3 but the mask is 1 x 2"):
        visual.overlay(image, mask[:, :2], VOC.palette)
