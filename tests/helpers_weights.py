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


def cause_checkpoint(dim=64, code=5, queries=9, hidden=32, concepts=6, seed=2):
    """The DHR release's CAUSE_<data>.pt layout: {"decoder": Segment_TR state, "codebook": [K, D]}."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    p = "head_ema.tr."
    decoder = {"head_ema.query_pos": r(queries, dim)}
    for attn in ("self_attn", "multihead_attn"):
        decoder.update({f"{p}{attn}.in_proj_weight": r(3 * dim, dim), f"{p}{attn}.in_proj_bias": r(3 * dim),
                        f"{p}{attn}.out_proj.weight": r(dim, dim), f"{p}{attn}.out_proj.bias": r(dim)})
    decoder.update({f"{p}linear1.weight": r(hidden, dim), f"{p}linear1.bias": r(hidden),
                    f"{p}linear2.weight": r(dim, hidden), f"{p}linear2.bias": r(dim)})
    for n in ("norm1", "norm2", "norm3"):
        decoder.update({f"{p}{n}.weight": 1 + r(dim), f"{p}{n}.bias": r(dim)})
    decoder.update({f"{p}f1.weight": r(code, dim, 1, 1), f"{p}f1.bias": r(code), f"{p}f2.0.weight": r(dim, dim, 1, 1),
                    f"{p}f2.0.bias": r(dim), f"{p}f2.2.weight": r(code, dim, 1, 1), f"{p}f2.2.bias": r(code)})
    return {"decoder": decoder, "codebook": r(concepts, dim) * 5}
