"""Tiny random weight files in the official layouts (DINO, DINOv2, STEGO), made in the tests."""
from __future__ import annotations

import torch


def vit_state(*, dim=64, depth=2, patch=4, grid=4, registers=0, layerscale=False, swiglu=False, hidden=96, seed=0):
    """A ViT state dict with the official DINO / DINOv2 key names and random values."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.2: torch.randn(*shape, generator=g) * s  # noqa: E731
    state = {
        "cls_token": r(1, 1, dim), "pos_embed": r(1, grid * grid + 1, dim),
        "patch_embed.proj.weight": r(dim, 3, patch, patch), "patch_embed.proj.bias": r(dim),
        "norm.weight": 1 + r(dim), "norm.bias": r(dim),
    }
    if registers:
        state["register_tokens"] = r(1, registers, dim)
        state["mask_token"] = r(1, dim)
    for b in range(depth):
        p = f"blocks.{b}."
        state.update({
            p + "norm1.weight": 1 + r(dim), p + "norm1.bias": r(dim), p + "norm2.weight": 1 + r(dim), p + "norm2.bias": r(dim),
            p + "attn.qkv.weight": r(3 * dim, dim), p + "attn.qkv.bias": r(3 * dim),
            p + "attn.proj.weight": r(dim, dim), p + "attn.proj.bias": r(dim),
        })
        if swiglu:
            state.update({p + "mlp.w12.weight": r(2 * hidden, dim), p + "mlp.w12.bias": r(2 * hidden),
                          p + "mlp.w3.weight": r(dim, hidden), p + "mlp.w3.bias": r(dim)})
        else:
            state.update({p + "mlp.fc1.weight": r(hidden, dim), p + "mlp.fc1.bias": r(hidden),
                          p + "mlp.fc2.weight": r(dim, hidden), p + "mlp.fc2.bias": r(dim)})
        if layerscale:
            state.update({p + "ls1.gamma": 1 + r(dim), p + "ls2.gamma": 1 + r(dim)})
    return state


def stego_head(dim=64, code=7, seed=1):
    """The DHR release's STEGO_<data>.pt layout: {"cluster1": {...}, "cluster2": {...}}."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    return {"cluster1": {"0.weight": r(code, dim, 1, 1), "0.bias": r(code)},
            "cluster2": {"0.weight": r(dim, dim, 1, 1), "0.bias": r(dim), "2.weight": r(code, dim, 1, 1), "2.bias": r(code)}}
