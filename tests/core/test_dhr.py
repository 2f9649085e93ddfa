"""The three DHR steps and the ablation rows of Table 6, on tiny synthetic scenes."""
import numpy as np
import pytest

from dhr_label.core import dhr
from dhr_label.core.crf import pydense as crf_module
from dhr_label.core.crf.pydense import PydenseCRF as ImageCRF
from dhr_label.core.dhr import integrate, rebalance, refine, seed_mask
from dhr_label.core.pipeline import ImageState, class_marginal, correlated_groups, seed_transport
from dhr_label.params import CRFParams, DHRParams, Marginal, Steps

BG = 0
H, W = 24, 32


# --------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------
def _corner_scene(two_tags: bool):
    """Tag 3 covers the top-left 8 x 10 corner (and tag 5 the bottom-right 6 x 8 one); the rest,
    over 80 % of the pixels, is background. The CAM (6 x 8 cells of 4 x 4 pixels) peaks on the
    objects; the image colours them apart from the background."""
    rng = np.random.default_rng(11)
    truth = np.full((H, W), BG, dtype=np.uint8)
    truth[:8, :10] = 3
    labels = [3]
    if two_tags:
        truth[-6:, -8:] = 5
        labels.append(5)
    image = np.full((H, W, 3), 120, dtype=np.uint8)
    image[truth == 3] = (230, 40, 40)
    image[truth == 5] = (40, 40, 230)
    cells = truth.reshape(6, 4, 8, 4).transpose(0, 2, 1, 3).reshape(6, 8, 16)
    cam = np.stack([(cells == tag).mean(axis=2) for tag in labels]).astype(np.float32)
    cam += rng.uniform(0, 0.05, cam.shape).astype(np.float32)
    return truth, np.array(labels), image, cam


def _ablation_scene():
    """24 x 32 image, tags 3 and 5 on a background; random but seeded CAMs and features."""
    rng = np.random.default_rng(5)
    truth, labels, image, cam = _corner_scene(two_tags=True)
    cam = cam + rng.normal(0, 0.2, cam.shape).astype(np.float32)
    base = truth.copy()
    base[base == 5] = BG  # the base mask lost tag 5
    base[10:12, 12:14] = 255  # and holds some ignore pixels
    uss = rng.normal(size=(8, 6, 8)).astype(np.float32)
    wss = [rng.normal(size=(4, 12, 16)).astype(np.float32), rng.normal(size=(6, 3, 4)).astype(np.float32)]
    return dict(cam=cam, labels=labels, image=image, base=base, uss=uss, wss=wss, background=BG)


def _row(row: int, **changes) -> DHRParams:
    return DHRParams(steps=Steps.row(row), **changes)


def seed_scores(cam, params, base, labels):
    """Step 1.1-1.2 as refine runs it: the transport the pipeline plans, then the scores."""
    state = ImageState(cam, labels, None, base)
    return dhr.seed_scores(cam, seed_transport(state, params), params)


# --------------------------------------------------------------------------------------------
# Class marginals
# --------------------------------------------------------------------------------------------
def test_class_marginal_kinds():
    mask = np.array([[1, 1, 1, 2], [1, 1, 2, 255], [9, 9, 9, 9]], dtype=np.uint8)
    classes = np.array([1, 2, 7])
    assert class_marginal(Marginal.uniform, classes, mask, 0.01) == (None, False)
    assert class_marginal(Marginal.unbalanced, classes, mask, 0.01) == (None, True)
    assert class_marginal(Marginal.area, classes, None, 0.01) == (None, False)
    # Counts among the classes: 5, 2, 0 (ignore and class 9 are not among them).
    v, kl = class_marginal(Marginal.area, classes, mask, 0.01)
    assert not kl
    np.testing.assert_allclose(v, np.array([5 / 7, 2 / 7, 0.01]) / (1 + 0.01), atol=1e-12)
    # No pixel of the mask holds any of the classes: uniform.
    assert class_marginal(Marginal.area, np.array([4, 6]), mask, 0.01) == (None, False)


# --------------------------------------------------------------------------------------------
# Step 1
# --------------------------------------------------------------------------------------------
def test_seed_scores_relu_and_max_normalisation_without_ot():
    cam = np.array([[[-1.0, 2.0], [4.0, 0.0]], [[-3.0, -1.0], [-2.0, -0.5]]], dtype=np.float32)
    before = cam.copy()
    out = seed_scores(cam, _row(3), None, np.array([1, 2]))
    np.testing.assert_allclose(out[0], [[0.0, 0.5], [1.0, 0.0]], atol=1e-7)
    np.testing.assert_array_equal(out[1], 0.0)  # all negative: 0, not NaN
    np.testing.assert_array_equal(cam, before)


def test_seed_scores_with_ot_multiply_by_f_ot():
    rng = np.random.default_rng(0)
    cam = rng.uniform(0, 2, (3, 4, 5)).astype(np.float32)
    out = seed_scores(cam, _row(4), None, np.array([1, 2, 3]))
    normalised = cam / cam.reshape(3, -1).max(axis=1)[:, None, None]
    cells = normalised.reshape(3, -1).T
    expected = (cells * dhr.f_ot(cells)).T.reshape(3, 4, 5)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    # A single tag has nothing to transport: the normalised CAM itself.
    np.testing.assert_allclose(seed_scores(cam[:1], _row(4), None, np.array([1])), normalised[:1], atol=1e-7)


def _one_row_crf(params: DHRParams, width: int = 3) -> ImageCRF:
    return ImageCRF(np.zeros((1, width, 3), dtype=np.uint8), params.crf)


def test_seed_mask_background_score_and_gamma_without_crf():
    scores = np.array([[[0.9, 0.4, 0.2]]], dtype=np.float32)  # one tag, 1 x 3, no resize
    # gamma 1: bg = 0.1, 0.6, 0.8 -> tag, bg, bg.
    params = _row(2)
    np.testing.assert_array_equal(seed_mask(scores, np.array([3]), BG, params, _one_row_crf(params)), [[3, 0, 0]])
    # gamma 2: bg = 0.01, 0.36, 0.64 -> tag, tag, bg.
    params = _row(2, gamma=2.0)
    np.testing.assert_array_equal(seed_mask(scores, np.array([3]), BG, params, _one_row_crf(params)), [[3, 3, 0]])


def test_seed_mask_without_background_maps_channels_to_tags():
    scores = np.array([[[0.9, 0.4, 0.2]], [[0.1, 0.5, 0.3]]], dtype=np.float32)
    params = _row(2)
    out = seed_mask(scores, np.array([4, 9]), None, params, _one_row_crf(params))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[4, 9, 9]])


def test_integrate_restores_a_lost_tag_from_the_seed():
    seed = np.array([[3, 3, 0], [3, 3, 0]], dtype=np.uint8)
    base = np.array([[3, 7, 0], [0, 255, 0]], dtype=np.uint8)  # 1 of 4 seed pixels kept
    before = base.copy()
    init, restored = integrate(seed, base, np.array([3]), 0.5)
    np.testing.assert_array_equal(init, [[3, 3, 0], [3, 3, 0]])
    assert restored == [3]
    np.testing.assert_array_equal(base, before)


def test_integrate_leaves_a_kept_tag_and_the_background_untouched():
    seed = np.array([[5, 5, 0, 0], [5, 5, 0, 0]], dtype=np.uint8)
    base = np.array([[5, 5, 5, 0], [5, 0, 5, 5]], dtype=np.uint8)  # 3 of 4 kept, more of 5 elsewhere
    init, restored = integrate(seed, base, np.array([5]), 0.5)
    np.testing.assert_array_equal(init, base)
    assert restored == []


@pytest.mark.parametrize(
    "rho, restored",
    [(0.5, False), (0.51, True), (0.0, False), (1.0, True)],
)
def test_integrate_rho_boundary(rho, restored):
    # Seed region of 4 pixels, 2 of them kept by the base: lost iff 2 < rho * 4.
    seed = np.array([[3, 3, 3, 3]], dtype=np.uint8)
    base = np.array([[3, 3, 0, 0]], dtype=np.uint8)
    init, got = integrate(seed, base, np.array([3]), rho)
    assert got == ([3] if restored else [])
    np.testing.assert_array_equal(init, seed if restored else base)


def test_integrate_without_base_is_the_seed_and_ignores_absent_tags():
    seed = np.array([[3, 0]], dtype=np.uint8)
    init, restored = integrate(seed, None, np.array([3]), 0.5)
    np.testing.assert_array_equal(init, seed)
    assert init is not seed and restored == []
    init, restored = integrate(seed, np.zeros_like(seed), np.array([5]), 0.5)  # tag 5 not in the seed
    assert restored == [] and (init == 0).all()


@pytest.mark.parametrize("two_tags", [False, True])
def test_background_survives_step_1_through_refine(two_tags):
    # The released code's CRF over the foreground channels alone, with "1 - max" as an ignore
    # channel, turns a one- or two-tag crop entirely into foreground. Here the base lost every
    # tag (all background), so whatever Step 1 writes comes from the seed.
    truth, labels, image, cam = _corner_scene(two_tags)
    base = np.full((H, W), BG, dtype=np.uint8)
    result = refine(cam, labels, image=image, base=base, uss=None, wss=None, background=BG, params=_row(4))
    assert result.restored == labels.tolist()
    background = truth == BG
    assert (result.seed[background] == BG).mean() > 0.95
    assert (result.mask[background] == BG).mean() > 0.95
    for tag in labels:
        assert (result.mask[truth == tag] == tag).mean() > 0.9
    # A base that kept its tags comes through Step 1 unchanged, background included.
    kept = refine(cam, labels, image=image, base=truth, uss=None, wss=None, background=BG, params=_row(4))
    assert kept.restored == []
    np.testing.assert_array_equal(kept.mask, truth)


# --------------------------------------------------------------------------------------------
# Steps 2 and 3
# --------------------------------------------------------------------------------------------
def _unit(*xs):
    v = np.array(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_correlated_groups_by_hand():
    centroids = np.stack(
        [
            _unit(1, 0, 0),
            _unit(0.9, np.sqrt(1 - 0.81), 0),  # cos 0.9 with 0
            _unit(0.7, 0, np.sqrt(1 - 0.49)),  # cos 0.7 with 0, 0.63 with 1
            _unit(-1, 0, 0),  # cos -1, -0.9, -0.7: ReLU'd to 0
        ]
    )
    centroids = centroids * np.array([[1.0], [2.0], [0.5], [3.0]], dtype=np.float32)  # scale-free
    assert correlated_groups(centroids, 0.8) == [[0, 1]]
    assert correlated_groups(centroids, 0.6) == [[0, 1, 2], [1, 2]]  # j > i only: no [1, 0]
    assert correlated_groups(centroids, 0.0) == [[0, 1, 2], [1, 2]]  # negatives never group
    assert correlated_groups(centroids, 0.95) == []


def test_tau_one_gives_no_groups_even_for_parallel_centroids():
    rng = np.random.default_rng(0)
    for _ in range(50):
        v = rng.normal(size=16).astype(np.float32)
        assert correlated_groups(np.stack([v, 3 * v, v]), 1.0) == []


def _two_halves_scene():
    """Class 1 on the left half, 2 on the right; M_init wrongly gives class 1 a 8 x 8 block of the
    right half. USS features (6 x 8 cells of 4 x 4 pixels) are e1 on the left, e2 on the right."""
    rng = np.random.default_rng(2)
    truth = np.full((H, W), 2, dtype=np.uint8)
    truth[:, :16] = 1
    init = truth.copy()
    init[:8, 16:24] = 1
    image = np.where(truth[..., None] == 1, 60, 190).astype(np.uint8).repeat(3, axis=2)
    uss = np.zeros((6, 6, 8), dtype=np.float32)
    uss[0, :, :4] = 1.0
    uss[1, :, 4:] = 1.0
    uss += rng.normal(0, 0.05, uss.shape).astype(np.float32)
    return truth, init, image, uss


@pytest.mark.parametrize("row", [5, 6, 7])
def test_rebalance_corrects_a_mislabelled_block(row):
    # Soft CAP: V_2 = e2, V_1 = (24 e1 + 4 e2) / 28, so the wrong block's cells are nearer V_2.
    truth, init, image, uss = _two_halves_scene()
    params = _row(row)
    out = rebalance(
        init, uss=uss if params.steps.uss else None, wss=[uss] if params.steps.wss else None, params=params,
        crf=ImageCRF(image, params.crf),
    )
    mask, groups = out.mask, out.groups
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, truth)
    assert groups == []  # cos(V_1, V_2) = 4 / sqrt(24^2 + 4^2) = 0.16 < tau


def test_rebalance_groups_classes_the_uss_cannot_tell_apart():
    # USS centroids of 1 and 2 at cos 1 / 1.04 = 0.96 > tau = 0.8; the WSS layer separates them.
    truth, init, image, _ = _two_halves_scene()
    rng = np.random.default_rng(4)
    truth[:, 28:] = 0
    init[:, 28:] = 0
    image[:, 28:] = 255
    cells = truth[::4, ::4]
    uss = np.zeros((4, 6, 8), dtype=np.float32)
    uss[0] = np.isin(cells, [1, 2])
    uss[1] = 0.2 * (cells == 1)
    uss[2] = 0.2 * (cells == 2)
    uss[3] = cells == 0
    uss += rng.normal(0, 0.01, uss.shape).astype(np.float32)
    wss = np.stack([cells == 1, cells == 2, cells == 0]).astype(np.float32)
    wss += rng.normal(0, 0.05, wss.shape).astype(np.float32)
    params = _row(7)
    out = rebalance(init, uss=uss, wss=[wss], params=params, crf=ImageCRF(image, params.crf))
    mask, groups = out.mask, out.groups
    assert groups == [[1, 2]]
    np.testing.assert_array_equal(mask, truth)


def test_rebalance_with_a_single_class_returns_init():
    init = np.full((4, 6), 3, dtype=np.uint8)
    init[0, 0] = 255
    out = rebalance(init, uss=np.zeros((2, 2, 3), np.float32), wss=None, params=_row(5), crf=None)
    mask, groups = out.mask, out.groups
    np.testing.assert_array_equal(mask, init)
    assert mask is not init and groups == []


# --------------------------------------------------------------------------------------------
# Ablation rows through refine
# --------------------------------------------------------------------------------------------
def _forbid(monkeypatch, target, name):
    def refuse(*args, **kwargs):
        raise AssertionError(f"{name} must not run in this ablation row")

    monkeypatch.setattr(target, name, refuse)


def test_row_1_returns_base_unchanged(monkeypatch):
    scene = _ablation_scene()
    _forbid(monkeypatch, dhr, "f_ot")
    _forbid(monkeypatch, ImageCRF, "labels")
    result = refine(**scene, params=_row(1))
    np.testing.assert_array_equal(result.mask, scene["base"])
    assert result.mask is not scene["base"]
    with pytest.raises(ValueError, match="base mask"):
        refine(**{**scene, "base": None}, params=_row(1))


@pytest.mark.parametrize("row", [2, 3, 4])
def test_rows_2_to_4_return_init(row):
    scene = _ablation_scene()
    result = refine(**scene, params=_row(row))
    np.testing.assert_array_equal(result.mask, result.init)
    assert result.restored == [5]  # the tag the base lost
    assert result.mask.shape == (H, W) and result.mask.dtype == np.uint8
    assert set(np.unique(result.mask)) <= {BG, 3, 5, 255}


def test_row_2_is_row_4_without_the_crf(monkeypatch):
    scene = _ablation_scene()
    # Row 4 with a 0-iteration CRF: its labels are the argmax of the clipped channels.
    row_4 = refine(**scene, params=_row(4, crf=CRFParams(iterations=0)))
    _forbid(monkeypatch, ImageCRF, "labels")
    _forbid(monkeypatch, ImageCRF, "marginals")
    _forbid(monkeypatch, crf_module.dcrf, "DenseCRF2D")
    row_2 = refine(**scene, params=_row(2))
    np.testing.assert_array_equal(row_2.seed, row_4.seed)
    np.testing.assert_array_equal(row_2.mask, row_4.mask)


def test_row_3_skips_ot_and_row_4_does_not(monkeypatch):
    scene = _ablation_scene()
    calls = []
    real = dhr.f_ot
    monkeypatch.setattr(dhr, "f_ot", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    refine(**scene, params=_row(4))
    assert calls == [(6 * 8, 2)]  # cells x tags
    _forbid(monkeypatch, dhr, "f_ot")
    result = refine(**scene, params=_row(3))
    np.testing.assert_array_equal(result.mask, result.init)


@pytest.mark.parametrize(
    "row, drop",
    [(5, "wss"), (6, "uss"), (7, None)],
)
def test_rows_5_to_7_need_only_their_features(row, drop):
    scene = _ablation_scene()
    before = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in scene.items()}
    if drop:
        scene[drop] = None
    result = refine(**scene, params=_row(row))
    assert result.mask.shape == (H, W) and result.mask.dtype == np.uint8
    assert set(np.unique(result.mask)) <= {BG, 3, 5}  # every pixel gets a class, ignore included
    assert result.restored == [5]
    for key in ("cam", "base", "image"):
        np.testing.assert_array_equal(scene[key], before[key])  # inputs untouched


@pytest.mark.parametrize("drop, match", [("uss", "USS"), ("wss", "WSS")])
def test_row_7_needs_both_feature_sources(drop, match):
    scene = _ablation_scene()
    scene[drop] = None
    with pytest.raises(ValueError, match=match):
        refine(**scene, params=_row(7))
