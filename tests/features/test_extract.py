"""Multi-scale, flip and sliding-window inference with networks whose answer is known."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dhr_label.features.extract import Inference, concat_on_grid, multiscale

TOL = 1e-5


def pool(stride):
    """A translation-equivariant network: average pooling by ``stride``."""
    return lambda x: F.avg_pool2d(x, stride, ceil_mode=True)


def test_constant_image_gives_constant_features_at_every_scale_on_the_first_grid(device):
    images = torch.full((1, 3, 24, 32), 5.0, device=device)
    out = multiscale(pool(8), images, Inference(scales=(2.0, 1.0, 0.5), flip=True), multiple=8, stride=8)
    assert out.shape == (1, 3, 6, 8)  # the first scale's grid: 48 x 64 / 8
    assert torch.allclose(out, torch.full_like(out, 5.0), atol=TOL)


def test_flip_averages_the_mirror_flipped_back():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    net = lambda x: x[:, :, :, :1].expand_as(x)  # noqa: E731  (copies the first column: not flip-equivariant)
    out = multiscale(net, images, Inference(flip=True), multiple=1, stride=1)
    expected = (images[:, :, :, :1] + images[:, :, :, -1:]) / 2
    assert torch.allclose(out, expected.expand_as(out), atol=TOL)


def test_scaled_sizes_round_up_to_the_patch_size():
    seen = []

    def net(x):
        seen.append(tuple(x.shape[-2:]))
        return F.avg_pool2d(x, 14)

    multiscale(net, torch.rand(1, 3, 30, 45), Inference(scales=(1.0, 0.5)), multiple=14, stride=14)
    assert seen == [(42, 56), (28, 28)]  # int(15 * 1) = 15 -> 28, int(22.5) = 22 -> 28


def test_windows_tile_exactly_for_an_equivariant_network():
    images = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    whole = multiscale(pool(8), images, Inference(window=32), multiple=8, stride=8)
    # the short side is already the window: windows of 32 x 32 over 32 x 48, cells averaged exactly
    assert torch.allclose(whole, F.avg_pool2d(images, 8), atol=TOL)


def test_window_resizes_the_short_side_first():
    images = torch.rand(1, 3, 16, 24)
    out = multiscale(pool(4), images, Inference(window=32), multiple=4, stride=4)
    assert out.shape == (1, 3, 8, 12)  # 16 x 24 -> 32 x 48, cells of 4


def test_concat_on_grid_upsamples_to_the_first():
    a, b = torch.zeros(1, 2, 4, 6), torch.ones(1, 3, 2, 3)
    out = concat_on_grid([a, b])
    assert out.shape == (1, 5, 4, 6) and torch.allclose(out[:, 2:], torch.ones(1, 3, 4, 6))


def test_inference_validates():
    with pytest.raises(ValueError, match="scales"):
        Inference(scales=(0.0,))
    with pytest.raises(ValueError, match="window"):
        Inference(window=-1)
