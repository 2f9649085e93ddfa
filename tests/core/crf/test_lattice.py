"""The permutohedral lattice in torch: known answers, the C++ loop re-done in numpy, invariances."""
import math

import numpy as np
import pytest
import torch

from dhr_label.core.crf.filtering import permutohedral_filter
from dhr_label.core.crf.lattice import build_lattice, scale_factors, simplex_coordinates, slice_alpha
from dhr_label.core.crf.meanfield import bilateral_features, gaussian_features

# K(c 1) / K(1) = c holds exactly in real arithmetic; in float32 the two filterings round
# differently in the last bits of sums of a few dozen terms (measured <= 3.6e-7 relative).
CONSTANT_RTOL = 2e-6
# The d+1 blur directions commute on the infinite lattice, so K = S' B S is symmetric there;
# pydensecrf keeps only the points splatted to, and a neighbour outside that set reads 0,
# which breaks the commutation at the border of the occupied set. Measured relative
# asymmetry |<a,Kb> - <Ka,b>| / <a,Kb>: <= 2e-4 on dense position lattices, <= 3.1e-3 on a
# sparse bilateral lattice of a random-colour image.
SYMMETRY_RTOL_DENSE = 1e-3
SYMMETRY_RTOL_SPARSE = 1e-2
# An impulse through the lattice is a piecewise-linear interpolation of a blurred lattice
# (Adams et al. 2010, Sec. 4), not a sampled Gaussian: normalised to its peak, the response
# differs from exp(-r^2 / 2 s^2) by up to 0.12 (measured, s = 3-8 px, centred or not), while
# its standard deviation is within 2 % of s (the scale factors are chosen for that, p. 6).
IMPULSE_SHAPE_ATOL = 0.15
IMPULSE_STD_RTOL = 0.05
# Its peak may sit a few pixels off (flat top), but its centre of mass is within 0.0073 px of
# the impulse (measured on a 7 x 7 grid of positions, s = 3, 5, 8).
IMPULSE_CENTROID_ATOL = 0.05
# numpy float32 scalar arithmetic is IEEE like torch's, so the re-implementation of the C++
# loop gives the same weights bit for bit; a tolerance of a few ulps still flags any
# different operation order that changes results only in the last bits.
WEIGHT_ATOL = 0


def _image(height, width, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)


def _zeros_index(n, device):
    return torch.zeros(n, dtype=torch.int64, device=device)


# ----------------------------------------------------------------------------------------------
# The C++ loop (Permutohedral::init, SSE branch, one lane), scalar numpy float32
# ----------------------------------------------------------------------------------------------
def _reference_simplex(f: np.ndarray):
    """Keys (d+1, d) and barycentric weights (d+1) of one float32 feature vector."""
    f32 = np.float32
    d = len(f)
    sf = [f32(v) for v in scale_factors(d)]
    inv, dp1 = f32(1.0) / f32(d + 1), f32(d + 1)
    elevated = [f32(0)] * (d + 1)
    sm = f32(0)
    for j in range(d, 0, -1):
        cf = f32(f[j - 1] * sf[j - 1])
        elevated[j] = f32(sm - f32(j) * cf)
        sm = f32(sm + cf)
    elevated[0] = sm
    rem0, total = [], f32(0)
    for i in range(d + 1):
        v = np.rint(f32(inv * elevated[i]))  # round half to even, as cvtps2dq
        rem0.append(f32(v * dp1))
        total = f32(total + v)
    rank = [0] * (d + 1)
    for i in range(d):
        di = f32(elevated[i] - rem0[i])
        for j in range(i + 1, d + 1):
            if di < f32(elevated[j] - rem0[j]):
                rank[i] += 1
            else:
                rank[j] += 1
    for i in range(d + 1):
        rank[i] += int(total)
        if rank[i] < 0:
            rank[i] += d + 1
            rem0[i] = f32(rem0[i] + dp1)
        elif rank[i] >= d + 1:
            rank[i] -= d + 1
            rem0[i] = f32(rem0[i] - dp1)
    bary = [f32(0)] * (d + 2)
    for i in range(d + 1):
        v = f32(f32(elevated[i] - rem0[i]) * inv)
        bary[d - rank[i]] = f32(bary[d - rank[i]] + v)
        bary[d - rank[i] + 1] = f32(bary[d - rank[i] + 1] - v)
    bary[0] = f32(bary[0] + f32(f32(1) + bary[d + 1]))
    keys = np.zeros((d + 1, d), dtype=np.int64)
    for r in range(d + 1):
        for i in range(d):
            canonical = r if rank[i] <= d - r else r - (d + 1)
            keys[r, i] = (int(rem0[i]) + canonical + 32768) % 65536 - 32768  # a C short
    return keys, np.array(bary[: d + 1], dtype=np.float32)


@pytest.mark.parametrize("d", [2, 5])
def test_keys_and_weights_match_the_cpp_loop(device, d):
    rng = np.random.default_rng(d)
    features = (rng.random((64, d)) * 60 - 20).astype(np.float32)
    features[:4] = np.round(features[:4])  # on lattice planes: ties in the ranks and rounding
    features[4] = 0.0
    features[5, 0] = 20000.0  # keys beyond a C short wrap as pydensecrf stores them
    if d == 2:
        # elevated[2] = -2 * 5.25 = -10.5 and -10.5 * float(1/3) is -3.5 exactly: a rounding
        # tie (the point is on a simplex face, one barycentric weight is 0).
        features[6] = [0.0, 5.25]
    coords = simplex_coordinates(torch.from_numpy(features).to(device))
    keys, weights = coords.keys.cpu().numpy(), coords.weights.cpu().numpy()
    for p, f in enumerate(features):
        ref_keys, ref_weights = _reference_simplex(f)
        np.testing.assert_array_equal(keys[p], ref_keys, err_msg=f"point {p}: {f}")
        np.testing.assert_allclose(weights[p], ref_weights, rtol=0, atol=WEIGHT_ATOL, err_msg=f"point {p}")
    assert np.allclose(weights.sum(axis=1), 1.0, atol=1e-5)


def test_points_are_the_distinct_keys_splatted_to(device):
    rng = np.random.default_rng(3)
    features = (rng.random((300, 5)) * 4).astype(np.float32)
    lattice = build_lattice(torch.from_numpy(features).to(device), _zeros_index(300, device))
    distinct = {tuple(k) for f in features for k in _reference_simplex(f)[0].tolist()}
    assert lattice.n_points == len(distinct)
    # Every pixel's d+1 vertices are distinct points; every point receives an entry.
    rows = lattice.slice_index.cpu()
    assert all(len(set(r.tolist())) == 6 for r in rows)
    assert set(rows.reshape(-1).tolist()) == set(range(1, lattice.n_points + 1))


# ----------------------------------------------------------------------------------------------
# Known answers of the filter
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gaussian", "bilateral"])
def test_constant_field_filters_to_the_constant_after_normalisation(device, kind):
    h, w = 30, 41
    image = _image(h, w, 0).to(device)
    features = gaussian_features(h, w, 3.0, device=device) if kind == "gaussian" else bilateral_features(image, 10.0, 13.0)
    lattice = build_lattice(features, _zeros_index(h * w, device))
    ones = torch.ones(h * w, 1, device=device)
    k1 = permutohedral_filter(lattice, ones)
    constants = torch.tensor([[0.37, 0.25, 3.3, 1e-3]], device=device)
    ratio = permutohedral_filter(lattice, ones * constants) / k1
    torch.testing.assert_close(ratio, constants.expand_as(ratio), rtol=CONSTANT_RTOL, atol=0)
    assert torch.equal(ratio[:, 1], torch.full_like(ratio[:, 1], 0.25))  # powers of two: exact


@pytest.mark.parametrize("kind, rtol", [("gaussian", SYMMETRY_RTOL_DENSE), ("bilateral", SYMMETRY_RTOL_SPARSE)])
def test_filter_is_symmetric(device, kind, rtol):
    h, w = 40, 56
    image = _image(h, w, 1).to(device)
    features = gaussian_features(h, w, 3.0, device=device) if kind == "gaussian" else bilateral_features(image, 10.0, 20.0)
    lattice = build_lattice(features, _zeros_index(h * w, device))
    gen = torch.Generator().manual_seed(2)
    a, b = (torch.rand(h * w, 3, generator=gen).to(device) for _ in range(2))
    left = (a.double() * permutohedral_filter(lattice, b).double()).sum(dim=0)
    right = (permutohedral_filter(lattice, a).double() * b.double()).sum(dim=0)
    assert ((left - right).abs() / left).max().item() <= rtol


@pytest.mark.parametrize("sigma, centre", [(3.0, (40, 40)), (5.0, (37, 43)), (8.0, (40, 40))])
def test_impulse_response_is_close_to_the_gaussian(device, sigma, centre):
    size = 81
    lattice = build_lattice(gaussian_features(size, size, sigma, device=device), _zeros_index(size * size, device))
    impulse = torch.zeros(size * size, 1, device=device)
    cy, cx = centre
    impulse[cy * size + cx] = 1.0
    response = permutohedral_filter(lattice, impulse)[:, 0].view(size, size).double().cpu()
    yy, xx = torch.meshgrid(torch.arange(size).double(), torch.arange(size).double(), indexing="ij")
    r2 = (yy - cy) ** 2 + (xx - cx) ** 2
    exact = torch.exp(-r2 / (2 * sigma**2))
    mass = response.sum()
    centroid = ((response * yy).sum() / mass - cy, (response * xx).sum() / mass - cx)
    assert max(abs(float(c)) for c in centroid) <= IMPULSE_CENTROID_ATOL
    assert (response / response.max() - exact).abs().max().item() <= IMPULSE_SHAPE_ATOL
    std = math.sqrt((response * r2).sum().item() / response.sum().item() / 2)
    assert abs(std / sigma - 1) <= IMPULSE_STD_RTOL


def test_slice_alpha_and_scale_factors_are_pydensecrf_constants():
    assert slice_alpha(2) == np.float32(0.8)
    assert slice_alpha(5) == float(np.float32(1.0) / np.float32(1.03125))
    # C++: float inv_std_dev = sqrt(2.0 / 3.0) * (d+1); 1.0 / sqrt((i+2)(i+1)) * inv_std_dev in
    # double, stored as float. (Not the float of the exact product: 1.7320509 vs 1.7320508.)
    inv_std_dev = float(np.float32(math.sqrt(2.0 / 3.0) * 3))
    expected = [float(np.float32(1.0 / math.sqrt(k) * inv_std_dev)) for k in (2, 6)]
    assert scale_factors(2) == expected
    assert scale_factors(2)[0] != float(np.float32(math.sqrt(2 / 3) * 3 / math.sqrt(2)))


# ----------------------------------------------------------------------------------------------
# Batches, determinism, the two implementations, the re-ranked packing
# ----------------------------------------------------------------------------------------------
def _batch(device, sizes=((20, 31), (17, 12), (25, 25))):
    images = [_image(h, w, 10 + i).to(device) for i, (h, w) in enumerate(sizes)]
    features = torch.cat([bilateral_features(im, 8.0, 15.0) for im in images])
    counts = torch.tensor([h * w for h, w in sizes], device=device)
    index = torch.repeat_interleave(torch.arange(len(sizes), device=device), counts)
    return images, features, index


def test_images_of_a_batch_never_mix_and_match_their_own_lattice(device):
    images, features, index = _batch(device)
    batch = build_lattice(features, index)
    gen = torch.Generator().manual_seed(4)
    values = torch.rand(features.shape[0], 3, generator=gen).to(device)
    filtered = permutohedral_filter(batch, values)
    start, points = 0, 0
    for b, image in enumerate(images):
        n = image.shape[0] * image.shape[1]
        alone = build_lattice(features[start : start + n], _zeros_index(n, device))
        assert torch.equal(filtered[start : start + n], permutohedral_filter(alone, values[start : start + n]))  # bit for bit
        points += alone.n_points
        start += n
    assert batch.n_points == points


def test_both_filter_methods_and_repeated_runs_are_bit_identical(device):
    _, features, index = _batch(device)
    gen = torch.Generator().manual_seed(5)
    values = torch.rand(features.shape[0], 7, generator=gen).to(device)
    lattice = build_lattice(features, index)
    first = permutohedral_filter(lattice, values, method="segments")
    assert torch.equal(first, permutohedral_filter(lattice, values, method="bags"))
    assert torch.equal(first, permutohedral_filter(build_lattice(features, index), values, method="segments"))
    mixed = torch.arange(features.shape[0], device=device) % 3 == 0
    part = permutohedral_filter(lattice, values, alpha_last=mixed, method="bags")
    assert torch.equal(part, permutohedral_filter(lattice, values, alpha_last=mixed, method="segments"))
    assert torch.equal(part[mixed], permutohedral_filter(lattice, values, alpha_last=True)[mixed])
    assert torch.equal(part[~mixed], first[~mixed])
    assert not torch.equal(part[mixed], first[mixed])  # the two slicing orders do differ


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_both_index_widths_filter_bit_identically_with_both_methods(device, index_dtype):
    """CUDA builds int32 indices and filters by segments; the CPU int64 and bags. Either width
    with either method gives the same result (so the CUDA path is exercised here too)."""
    _, features, index = _batch(device)
    gen = torch.Generator().manual_seed(6)
    values = torch.rand(features.shape[0], 5, generator=gen).to(device)
    lattice = build_lattice(features, index, index_dtype=index_dtype)
    assert lattice.slice_index.dtype == lattice.blur_index.dtype == lattice.splat_pixel.dtype == index_dtype
    reference = permutohedral_filter(build_lattice(features, index, index_dtype=torch.int64), values, method="bags")
    for method in ("segments", "bags"):
        assert torch.equal(permutohedral_filter(lattice, values, method=method), reference), method
        assert torch.equal(permutohedral_filter(lattice, values, alpha_last=True, method=method),
                           permutohedral_filter(build_lattice(features, index), values, alpha_last=True, method="bags")), method


def test_default_index_width_is_int32_on_cuda_only(device):
    _, features, index = _batch(device)
    expected = torch.int32 if device.type == "cuda" else torch.int64
    assert build_lattice(features, index).slice_index.dtype == expected


def test_reranked_packing_builds_the_same_lattice(device):
    """Keys too wide for one int64 (large images, small sigmas) are re-ranked: same lattice."""
    _, features, index = _batch(device)
    direct = build_lattice(features, index)
    ranked = build_lattice(features, index, code_limit=1000)
    for name in ("splat_entry", "splat_offsets", "blur_index", "slice_index", "slice_weight"):
        assert torch.equal(getattr(direct, name), getattr(ranked, name)), name


def test_invalid_inputs_are_refused(device):
    features = torch.zeros(10, 2, device=device)
    with pytest.raises(ValueError, match="features must be"):
        build_lattice(features.double(), _zeros_index(10, device))
    with pytest.raises(ValueError, match=r"image_index must be \(10,\)"):
        build_lattice(features, _zeros_index(9, device))
    with pytest.raises(ValueError, match="index_dtype must be torch.int32 or torch.int64"):
        build_lattice(features, _zeros_index(10, device), index_dtype=torch.int16)
    lattice = build_lattice(features, _zeros_index(10, device))
    with pytest.raises(ValueError, match=r"values must be \(10, L\) float32"):
        permutohedral_filter(lattice, torch.zeros(9, 2, device=device))
    with pytest.raises(ValueError, match="method must be one of"):
        permutohedral_filter(lattice, torch.zeros(10, 2, device=device), method="atomic")


@pytest.mark.slow
def test_cityscapes_size_with_unit_sigma_builds(device):
    """2048 x 1024 with sxy = 1: the bilateral keys need the wide packing path to be sound."""
    h, w = 1024, 2048
    image = _image(h, w, 7).to(device)
    lattice = build_lattice(bilateral_features(image, 1.0, 3.0), _zeros_index(h * w, device))
    assert lattice.n_points > h * w
    out = permutohedral_filter(lattice, torch.ones(h * w, 1, device=device), alpha_last=True)
    assert bool(torch.isfinite(out).all()) and float(out.min()) > 0
