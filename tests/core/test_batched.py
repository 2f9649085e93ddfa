"""The batched executor (core/batched) against the one-image numpy core, on any ``--device``.

Every batched op is checked image by image against the numpy function it replaces, on batches
whose images differ in cells, tags and classes (so padding and masks are exercised); then
whole batches run through :func:`run_batch` with the pydensecrf CRF per image (the same CRF as
the numpy core, so every difference would be the batched stages') and the masks are compared
pixel by pixel.
"""
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dhr_label.core import cap, dhr, ot, pipeline  # noqa: E402
from dhr_label.core.batched import refine_batch, run_batch  # noqa: E402
from dhr_label.core.batched.sinkhorn import sinkhorn, transport  # noqa: E402
from dhr_label.core.batched.stages import cell_fractions  # noqa: E402
from dhr_label.core.batched.tensors import WORK, length_mask, pad_stack  # noqa: E402
from dhr_label.core.ot import OTConvergenceWarning  # noqa: E402
from dhr_label.core.pipeline import ImageState, Transport  # noqa: E402
from dhr_label.core.prototypes import add_sums, finish, image_sums  # noqa: E402
from dhr_label.params import CapMode, CRFBackend, CRFParams, DHRParams, Marginal, OTParams, Steps  # noqa: E402

PLAN_ATOL = 1e-7  # plans hold ~1/(N K) ~ 1e-3: float32 (numpy) against float64 rounding
MAP_ATOL = 2e-5  # maps in [0, 1] after min-max, OT and cosines: float32 rounding of the numpy core
# Steps 2-3 chain cosines, three OT calls (up to max_iter Sinkhorn iterations where one does
# not converge) and min-max stretches: the float32 core's rounding grows to ~1e-5 of [0, 1].
HEAT_ATOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """As the executors do on a CPU: tiny ops on 2 threads of a busy machine crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SHAPES = [(50, 4), (30, 2), (64, 7), (10, 1), (3, 3)]


def score_batch(seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [rng.uniform(0, 1, shape).astype(np.float32) for shape in shapes]


def padded(arrays, device):
    values, shapes = pad_stack(arrays, device)
    rows = length_mask([s[0] for s in shapes], values.shape[1], device)
    cols = length_mask([s[1] for s in shapes], values.shape[2], device)
    return values, rows, cols


# ----------------------------------------------------------------------------------------------
# f_OT
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kl_weight", [None, 0.1])
def test_sinkhorn_matches_numpy_plan_and_stopping_iteration(device, kl_weight):
    scores = score_batch(shapes=SHAPES[:3] + SHAPES[4:])
    result = sinkhorn(*padded(scores, device), kl_weight=kl_weight)
    for b, s in enumerate(scores):
        ref = ot.sinkhorn(s, kl_weight=kl_weight)
        n, k = s.shape
        assert int(result.iterations[b]) == ref.iterations  # frozen at its own check
        np.testing.assert_allclose(result.plan[b, :n, :k].cpu().numpy(), ref.plan, atol=PLAN_ATOL)
        assert float(result.plan[b, n:].abs().sum()) == 0 and float(result.plan[b, :, k:].abs().sum()) == 0
        assert bool(result.converged[b]) == ref.converged


def test_transport_matches_numpy_with_marginals_one_class_and_the_log_domain(device):
    scores = score_batch(seed=2)
    scores.append(np.random.default_rng(3).uniform(0, 30, (20, 3)).astype(np.float32))  # log domain
    calls = [Transport(np.arange(s.shape[1]), None, False) for s in scores]
    calls[0] = Transport(np.arange(4), np.array([0.1, 0.2, 0.3, 0.4]), False)
    calls[2] = Transport(np.arange(7), None, True)  # unbalanced
    calls[4] = None  # nothing to transport
    rows = [torch.as_tensor(s.T, dtype=WORK, device=device) for s in scores]  # G x N, as the stages pass them
    values, notes = transport(rows, calls, OTParams(), kl_weight=0.1)
    for s, call, got in zip(scores, calls, values):
        if call is None or s.shape[1] == 1:
            np.testing.assert_array_equal(got.cpu().numpy(), 1.0)
            continue
        ref = ot.f_ot(s, OTParams(), col_marginal=call.marginal, kl_weight=0.1 if call.kl else None)
        np.testing.assert_allclose(got.cpu().numpy().T, ref, atol=MAP_ATOL)
    assert notes == [None] * len(scores)


def test_transport_warns_as_numpy_when_sinkhorn_stops_at_max_iter(device):
    scores = score_batch(seed=4, shapes=[(50, 4)])
    params = OTParams(max_iter=3)
    _, notes = transport([torch.as_tensor(scores[0].T, dtype=WORK, device=device)], [Transport(np.arange(4), None, False)], params, 0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ot.f_ot(scores[0], params)
    (warning,) = [w for w in caught if w.category is OTConvergenceWarning]
    assert notes[0] == f"OTConvergenceWarning: {warning.message}"


# ----------------------------------------------------------------------------------------------
# Leaf operations written once (core/cap.py) on tensors
# ----------------------------------------------------------------------------------------------
def test_leaf_operations_take_tensors_batched_and_match_numpy(device):
    rng = np.random.default_rng(7)
    features = rng.normal(size=(2, 16, 30)).astype(np.float32)
    weights = rng.uniform(0, 1, (2, 3, 30)).astype(np.float32)
    weights[1, 2] = 0.0  # a class with no weight: no centroid, no heat
    maps, centroids = cap.heat_maps(torch.as_tensor(features, device=device), torch.as_tensor(weights, device=device))
    for b in range(2):
        ref_maps, ref_centroids = cap.heat_maps(features[b], weights[b])
        np.testing.assert_allclose(maps[b].cpu().numpy(), ref_maps, atol=MAP_ATOL)
        np.testing.assert_allclose(centroids[b].cpu().numpy(), ref_centroids, atol=1e-5)
    np.testing.assert_array_equal(maps[1, 2].cpu().numpy(), 0.0)


def test_minmax_ignores_padding(device):
    values = torch.tensor([[1.0, 3.0, 5.0, 100.0]], device=device)
    valid = torch.tensor([[True, True, True, False]], device=device)
    out = cap.minmax(values, -1, valid=valid)
    np.testing.assert_allclose(out.cpu().numpy(), [[0.0, 0.5, 1.0, 0.0]], atol=1e-7)


def label_maps(seed=6):
    rng = np.random.default_rng(seed)
    inits = [rng.integers(0, 4, (97, 131)).astype(np.uint8), rng.integers(0, 3, (50, 40)).astype(np.uint8)]
    inits[0][:5] = 255  # ignore pixels count for no class
    inits[1][inits[1] == 2] = 7
    classes = [np.array([0, 1, 3]), np.array([0, 1, 7])]
    states = [ImageState(None, np.zeros(0, np.int64), None, None, init=i, classes=c) for i, c in zip(inits, classes)]
    return states, [(12, 16), (7, 5)]


@pytest.mark.parametrize("mode", ["soft", "majority"])
def test_cell_fractions_equal_numpy(device, mode):
    states, grids = label_maps()
    weights, cells = cell_fractions(states, grids, mode, device)
    for b, s in enumerate(states):
        ref = cap.class_cell_fractions(s.init, s.classes, grids[b], mode=mode)
        g, n = ref.shape
        # Exact pixel counts on both sides; the numpy core rounds the fractions to float32.
        np.testing.assert_allclose(weights[b, :g, :n].cpu().numpy(), ref, rtol=1e-7, atol=0)
        assert float(weights[b, g:].sum()) == 0 and float(weights[b, :, n:].sum()) == 0
        assert int(cells[b].sum()) == n


# ----------------------------------------------------------------------------------------------
# Whole batches through the stages
# ----------------------------------------------------------------------------------------------
def scenes(seed=10):
    """Four images of different sizes, tags, grids; siblings share a prototype, so Step 3 finds
    groups; one base mask lost a tag, one image has no base mask."""
    rng = np.random.default_rng(seed)
    out = []
    for index, ((height, width), members, grid) in enumerate(
        [((64, 80), [0, 2, 5, 9], (16, 20)), ((40, 32), [0, 1, 3], (8, 6)), ((72, 96), [0, 4, 6], (12, 16)), ((48, 48), [0, 8], (6, 6))]
    ):
        truth = np.asarray(members, dtype=np.uint8)[rng.integers(0, len(members), (height // 8, width // 8))]
        truth = np.kron(truth, np.ones((8, 8), dtype=np.uint8))
        proto = rng.normal(size=(10, 24)).astype(np.float32)
        proto[5] = proto[2] + 0.05 * rng.normal(size=24)  # 2 and 5 are siblings: one group
        proto[6] = proto[4] + 0.05 * rng.normal(size=24)

        def features(grid_hw, dim):
            fractions = cap.class_cell_fractions(truth, np.arange(10), grid_hw)
            base = np.tile(proto.T @ fractions, (max(1, dim // 24), 1))[:dim]
            return (base + 0.1 * rng.normal(size=base.shape)).astype(np.float32).reshape(dim, *grid_hw)

        tags = np.asarray(members[1:])
        cam_grid = (height // 8, width // 8)
        cam = np.stack([cap.class_cell_fractions(truth, np.array([t]), cam_grid)[0] for t in tags]).reshape(len(tags), *cam_grid)
        cam = (cam + 0.2 * rng.normal(size=cam.shape)).astype(np.float32)
        base = truth.copy()
        base[base == tags[-1]] = 0  # lost to the background
        base[:3, :3] = 255
        colours = rng.integers(0, 256, (10, 3))
        image = np.clip(colours[truth] + rng.integers(-8, 9, (height, width, 3)), 0, 255).astype(np.uint8)
        half = (max(1, grid[0] // 2), max(1, grid[1] // 2))
        out.append(dict(cam=cam, labels=tags, image=image, base=None if index == 3 else base,
                        uss=features(grid, 24), wss=[features(half, 48), features(grid, 24)]))
    return out


def refine_all(cases, params, device, prototypes=None):
    return refine_batch(
        [torch.as_tensor(c["cam"], device=device) for c in cases], [c["labels"] for c in cases],
        [torch.as_tensor(c["image"], device=device) for c in cases],
        bases=[None if c["base"] is None else torch.as_tensor(c["base"], device=device) for c in cases],
        uss=[torch.as_tensor(c["uss"], device=device) for c in cases],
        wss=[[torch.as_tensor(w, device=device) for w in c["wss"]] for c in cases],
        background=0, params=params, device=device, prototypes=prototypes,
    )


ROWS = {"full": DHRParams(), "groups": DHRParams(tau=0.5, cap=CapMode.majority), "area-init": DHRParams(marginal_init=Marginal.area),
        "row4": DHRParams(steps=Steps.row(4)), "row6": DHRParams(steps=Steps.row(6)), "row2": DHRParams(steps=Steps.row(2)),
        # guard 1.0: every class Steps 2-3 moved at all is guarded, so these scenes exercise it (at the default
        # 0.5 no class of theirs is); with its heat-map support (default) and whole regions
        "guard": DHRParams(guard=1.0), "guard-whole-region": DHRParams(guard=1.0, guard_support=0.0)}


@pytest.mark.parametrize("name", list(ROWS))
def test_batches_give_the_numpy_cores_masks(device, name):
    params = ROWS[name]  # CRF by pydensecrf on the host for both: differences would be the stages'
    cases = scenes()
    states = refine_all(cases, params, device)
    for case, state in zip(cases, states):
        ref = dhr.refine(**case, background=0, params=params)
        np.testing.assert_array_equal(state.mask.cpu().numpy(), ref.mask)
        np.testing.assert_array_equal(state.init.cpu().numpy(), ref.init)
        assert state.restored == ref.restored and state.groups == ref.groups
        if ref.heat is not None:
            np.testing.assert_allclose(state.heat.cpu().numpy(), ref.heat, atol=HEAT_ATOL)
    if name == "full":
        assert [s.groups for s in states if s.groups] == [[[2, 5]], [[4, 6]]]  # the siblings, where present
        assert all(s.mask.device.type == torch.device(device).type for s in states)


def scene_prototypes(cases, num_classes=10):
    sums = None
    for c in cases:
        if c["base"] is not None:
            sums = add_sums(sums, image_sums(c["base"], c["uss"], c["wss"], num_classes))
    return finish(sums)


@pytest.mark.parametrize("params", [DHRParams(prototype_weight=0.75), DHRParams(prototype_weight=0.75, wss_heat_weight=0.5),
                                    DHRParams(wss_heat_weight=1.0, tau=0.5)], ids=["prototypes", "prototypes+wss", "wss-mix"])
def test_batches_blend_prototypes_and_mix_wss_as_the_numpy_core(device, params):
    cases = scenes(seed=14)
    prototypes = scene_prototypes(cases)
    states = refine_all(cases, params, device, prototypes)
    changed = 0
    for case, state in zip(cases, states):
        ref = dhr.refine(**case, background=0, params=params, prototypes=prototypes)
        np.testing.assert_array_equal(state.mask.cpu().numpy(), ref.mask)
        assert state.groups == ref.groups
        np.testing.assert_allclose(state.heat.cpu().numpy(), ref.heat, atol=HEAT_ATOL)
        plain = dhr.refine(**case, background=0, params=DHRParams())
        changed += not np.allclose(plain.heat, ref.heat, atol=1e-3)
    assert changed  # the option reaches the heat maps


def test_an_images_mask_does_not_depend_on_its_batch(device):
    params = DHRParams(crf=CRFParams(backend=CRFBackend.torch)) if _has_torch_crf() else DHRParams()
    cases = scenes(seed=12)
    together = refine_all(cases, params, device)
    for case, state in zip(cases, together):
        alone = refine_all([case], params, device)[0]
        assert torch.equal(alone.mask, state.mask)


def test_ignore_below_blanks_uncertain_pixels(device):
    cases = scenes(seed=13)[:2]
    plain = refine_all(cases, DHRParams(), device)
    unsure = refine_all(cases, DHRParams(ignore_below=0.9), device)
    for p, u in zip(plain, unsure):
        keep = p.confidence >= 0.9
        assert torch.equal(u.mask[keep], p.mask[keep]) and bool((u.mask[~keep] == 255).all())
        assert 0 < int((~keep).sum()) < keep.numel()  # the threshold bites, and not everywhere


def test_refine_batch_checks_its_lists(device):
    case = scenes()[0]
    with pytest.raises(ValueError, match=r"images: expected one entry per image \(1\), found 2"):
        refine_batch([torch.as_tensor(case["cam"])], [case["labels"]], [case["image"]] * 2, background=0, params=DHRParams(steps=Steps.row(4)), device=device)


def test_the_pipeline_decides_once_for_both_executors():
    # One class in M_init: M_init is the answer for both executors, by pipeline.advance alone.
    state = ImageState(None, np.zeros(0, np.int64), None, None, uss=np.zeros((2, 3, 3), np.float32),
                       init=np.full((6, 6), 4, np.uint8), next=pipeline.Stage.SEED_MASK)
    pipeline.advance(state, DHRParams(steps=Steps.row(5)))
    assert state.next is None and np.array_equal(state.mask, state.init) and state.mask is not state.init
    tensor_state = ImageState(None, np.zeros(0, np.int64), None, None, uss=torch.zeros(2, 3, 3),
                              init=torch.full((6, 6), 4, dtype=torch.uint8), next=pipeline.Stage.SEED_MASK)
    pipeline.advance(tensor_state, DHRParams(steps=Steps.row(5)))
    assert tensor_state.next is None and torch.equal(tensor_state.mask, tensor_state.init)
    run_batch([], DHRParams(), "cpu")  # nothing to do is not an error


def _has_torch_crf() -> bool:
    try:
        import dhr_label.core.crf.meanfield  # noqa: F401
    except ImportError:
        return False
    return True
