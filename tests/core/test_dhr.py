"""The public entry points — one image with numpy arrays, a batch of tensors — and the ablation
rows of Table 6 through them."""
import numpy as np
import pytest
import torch

from dhr_label.core import seed, stages
from dhr_label.core.crf import pydense
from dhr_label.core.dhr import Refinement, refine_batch, refine_image
from dhr_label.params import CRFParams, DHRParams, Steps

from .scenes import BG, H, W, ablation_scene, batch_scenes, corner_scene


def _row(row: int, **changes) -> DHRParams:
    return DHRParams(steps=Steps.row(row), **changes)


def _forbid(monkeypatch, target, name):
    def refuse(*args, **kwargs):
        raise AssertionError(f"{name} must not run in this ablation row")

    monkeypatch.setattr(target, name, refuse)


@pytest.mark.parametrize("two_tags", [False, True])
def test_background_survives_step_1(two_tags):
    # The released code's CRF over the foreground channels alone, with "1 - max" as an ignore
    # channel, turns a one- or two-tag crop entirely into foreground. Here the base lost every
    # tag (all background), so whatever Step 1 writes comes from the seed.
    truth, labels, image, cam = corner_scene(two_tags)
    base = np.full((H, W), BG, dtype=np.uint8)
    result = refine_image(cam, labels, image=image, base=base, uss=None, wss=None, background=BG, params=_row(4))
    assert isinstance(result, Refinement) and result.restored == labels.tolist()
    background = truth == BG
    assert (result.seed[background] == BG).mean() > 0.95
    assert (result.mask[background] == BG).mean() > 0.95
    for tag in labels:
        assert (result.mask[truth == tag] == tag).mean() > 0.9
    # A base that kept its tags comes through Step 1 unchanged, background included.
    kept = refine_image(cam, labels, image=image, base=truth, uss=None, wss=None, background=BG, params=_row(4))
    assert kept.restored == []
    np.testing.assert_array_equal(kept.mask, truth)


def test_row_1_returns_base_unchanged(monkeypatch):
    scene = ablation_scene()
    _forbid(monkeypatch, seed, "transport")
    _forbid(monkeypatch, stages, "image_crfs")
    result = refine_image(**scene, params=_row(1))
    np.testing.assert_array_equal(result.mask, scene["base"])
    assert result.mask is not scene["base"] and result.init is None
    with pytest.raises(ValueError, match="base mask"):
        refine_image(**{**scene, "base": None}, params=_row(1))


@pytest.mark.parametrize("row", [2, 3, 4])
def test_rows_2_to_4_return_init(row):
    result = refine_image(**ablation_scene(), params=_row(row))
    np.testing.assert_array_equal(result.mask, result.init)
    assert result.restored == [5]  # the tag the base lost
    assert result.mask.shape == (H, W) and result.mask.dtype == np.uint8
    assert set(np.unique(result.mask)) <= {BG, 3, 5, 255}


def test_row_2_is_row_4_without_the_crf(monkeypatch):
    scene = ablation_scene()
    # Row 4 with a 0-iteration CRF: its labels are the argmax of the clipped channels.
    row_4 = refine_image(**scene, params=_row(4, crf=CRFParams(iterations=0)))
    _forbid(monkeypatch, stages, "image_crfs")
    _forbid(monkeypatch, pydense.dcrf, "DenseCRF2D")
    row_2 = refine_image(**scene, params=_row(2))
    np.testing.assert_array_equal(row_2.seed, row_4.seed)
    np.testing.assert_array_equal(row_2.mask, row_4.mask)


def test_row_3_skips_ot_and_row_4_does_not(monkeypatch):
    scene = ablation_scene()
    calls = []
    real = seed.transport
    monkeypatch.setattr(seed, "transport", lambda scores, plans, *a, **k: calls.append(
        [tuple(s.shape) for s, p in zip(scores, plans) if p is not None]) or real(scores, plans, *a, **k))
    refine_image(**scene, params=_row(4))
    assert calls == [[(2, 6 * 8)]]  # tags x cells
    calls.clear()
    result = refine_image(**scene, params=_row(3))
    assert calls == [[]]  # no OT call planned
    np.testing.assert_array_equal(result.mask, result.init)


@pytest.mark.parametrize("row, drop", [(5, "wss"), (6, "uss"), (7, None)])
def test_rows_5_to_7_need_only_their_features(row, drop):
    scene = ablation_scene()
    before = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in scene.items()}
    if drop:
        scene[drop] = None
    result = refine_image(**scene, params=_row(row))
    assert result.mask.shape == (H, W) and result.mask.dtype == np.uint8
    assert set(np.unique(result.mask)) <= {BG, 3, 5}  # every pixel gets a class, ignore included
    assert result.restored == [5] and result.confidence.shape == (H, W)
    for key in ("cam", "base", "image"):
        np.testing.assert_array_equal(scene[key], before[key])  # inputs untouched


@pytest.mark.parametrize("drop, match", [("uss", "USS"), ("wss", "WSS")])
def test_row_7_needs_both_feature_sources(drop, match):
    scene = ablation_scene()
    scene[drop] = None
    with pytest.raises(ValueError, match=match):
        refine_image(**scene, params=_row(7))


def test_refine_batch_equals_refine_image_and_checks_its_lists(device):
    cases = batch_scenes()[:2]
    states = refine_batch([torch.as_tensor(c["cam"], device=device) for c in cases], [c["labels"] for c in cases],
                          [torch.as_tensor(c["image"], device=device) for c in cases], bases=[c["base"] for c in cases],
                          uss=[c["uss"] for c in cases], wss=[c["wss"] for c in cases], background=0, params=DHRParams())
    for case, state in zip(cases, states):
        assert state.mask.device.type == torch.device(device).type
        np.testing.assert_array_equal(state.mask.cpu().numpy(), refine_image(**case, background=0, params=DHRParams()).mask)
    with pytest.raises(ValueError, match=r"images: expected one entry per image \(1\), found 2"):
        refine_batch([cases[0]["cam"]], [cases[0]["labels"]], [cases[0]["image"]] * 2, background=0, params=_row(4), device=device)
