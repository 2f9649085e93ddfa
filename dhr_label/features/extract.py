"""Multi-scale, flip-averaged and sliding-window feature maps (the DHR release's USS inference).

For each scale s (in the given order) the image is resized bilinearly to ``s * H x s * W``,
rounded up to a multiple of the network's patch size, run with its horizontal mirror in one
batch, the mirror's map flipped back and the two averaged. Every scale's map is resized
bilinearly to the grid of the *first* scale and the scales are averaged: with the authors'
scales (2.0, 1.0, 1.5, 0.5) the output has twice the network's resolution. With a window, the
image's short side is first resized to the window size and each scale is covered by windows of
that size, half a window apart; a cell covered by several windows gets their mean.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

Network = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Inference:
    """How a network is run over an image (the part of the settings that is not the network)."""

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    window: int = 0  # 0: the whole image at once

    def __post_init__(self):
        if not self.scales or any(not (0 < s <= 8) for s in self.scales):
            raise ValueError(f"scales must be in (0, 8], found {list(self.scales)}")
        if self.window < 0:
            raise ValueError(f"window must be >= 0, found {self.window}")


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _rounded(size: float, multiple: int) -> int:
    return max(multiple, math.ceil(int(size) / multiple) * multiple)


def _flip_pair(net: Network, images: torch.Tensor, flip: bool) -> torch.Tensor:
    """``net`` on ``[B, 3, h, w]``, averaged with its run on the mirrored images when ``flip``."""
    if not flip:
        return net(images)
    b = images.shape[0]
    both = net(torch.cat([images, images.flip(-1)]))
    return (both[:b] + both[b:].flip(-1)) / 2


def _windows(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of ``window`` covering ``length``, about half a window apart, the
    last flush with the end; all multiples of ``stride`` (so are ``length`` and ``window``)."""
    if length <= window:
        return [0]
    step = max((window // 2) // stride * stride, stride)
    starts = list(range(0, length - window, step)) + [length - window]
    return sorted(set(starts))


def _windowed(net: Network, images: torch.Tensor, flip: bool, window: int, stride: int) -> torch.Tensor:
    """Features of ``images`` from overlapping windows, summed into the full grid and averaged."""
    height, width = images.shape[-2:]
    grid = (math.ceil(height / stride), math.ceil(width / stride))
    total = count = None
    for top in _windows(height, window, stride):
        for left in _windows(width, window, stride):
            crop = images[..., top: top + window, left: left + window]
            feats = _flip_pair(net, crop, flip)
            # the window's cells in the full grid (windows start on multiples of the stride)
            rows = (top // stride, top // stride + feats.shape[-2])
            cols = (left // stride, left // stride + feats.shape[-1])
            if total is None:
                total = feats.new_zeros((*feats.shape[:2], *grid))
                count = feats.new_zeros((1, 1, *grid))
            total[..., rows[0]: rows[1], cols[0]: cols[1]] += feats
            count[..., rows[0]: rows[1], cols[0]: cols[1]] += 1
    return total / count.clamp_min(1)


def multiscale(net: Network, images: torch.Tensor, inference: Inference, *, multiple: int, stride: int) -> torch.Tensor:
    """Averaged features ``[B, D, h, w]`` of ``[B, 3, H, W]`` images (any value range ``net`` takes).

    Parameters
    ----------
    net : callable
        ``[B, 3, h, w] -> [B, D, h / stride, w / stride]`` (rounded up).
    images : Tensor [B, 3, H, W]
        Images of one size, on the network's device.
    inference : Inference
        Scales, flip, window.
    multiple : int
        Each scaled size is rounded up to this (the patch size of a ViT; 1 for a CNN).
    stride : int
        The network's output stride (the window placement needs it).
    """
    if inference.window:
        # sizes on whole cells, so that windows tile the grid exactly
        multiple = max(multiple, stride)
        height, width = images.shape[-2:]
        ratio = inference.window / min(height, width)
        images = _resize(images, (_rounded(height * ratio, 1), _rounded(width * ratio, 1)))
        window = _rounded(inference.window, multiple)
    height, width = images.shape[-2:]
    out = None
    for scale in inference.scales:
        size = (_rounded(height * scale, multiple), _rounded(width * scale, multiple))
        scaled = _resize(images, size)
        if inference.window:
            feats = _windowed(net, scaled, inference.flip, window, stride)
        else:
            feats = _flip_pair(net, scaled, inference.flip)
        out = feats.float() if out is None else out + _resize(feats.float(), tuple(out.shape[-2:]))
    return out / len(inference.scales)


def concat_on_grid(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Maps ``[B, D_i, h_i, w_i]`` resized bilinearly to the first one's grid and concatenated."""
    size = tuple(maps[0].shape[-2:])
    return torch.cat([_resize(m, size) for m in maps], dim=1)
