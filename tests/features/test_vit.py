"""The DINO / DINOv2 ViT built from a state dict, against a direct transcription of the maths."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers_weights import vit_state

from dhr_label.features.vit import VisionTransformer

TOL = 1e-5  # float32 attention and layer norms on 16-64 tokens


def _reference(state, x, *, registers=0, layerscale=False, swiglu=False, offset=0.1, antialias=False):
    """The last block's normed patch tokens, written out from the papers' definitions."""
    dim = state["cls_token"].shape[-1]
    heads, patch = dim // 64, state["patch_embed.proj.weight"].shape[-1]
    b, _, h, w = x.shape
    rows, cols = h // patch, w // patch
    tokens = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=patch)
    tokens = tokens.flatten(2).transpose(1, 2)
    side = math.isqrt(state["pos_embed"].shape[1] - 1)
    grid = state["pos_embed"][:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if (rows, cols) != (side, side):
        kwargs = {"scale_factor": ((rows + offset) / side, (cols + offset) / side)} if offset else {"size": (rows, cols)}
        grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **kwargs)
    pos = torch.cat([state["pos_embed"][:, :1], grid.flatten(2).transpose(1, 2)], 1)
    z = torch.cat([state["cls_token"].expand(b, -1, -1), tokens], 1) + pos
    if registers:
        z = torch.cat([z[:, :1], state["register_tokens"].expand(b, -1, -1), z[:, 1:]], 1)
    ln = lambda t, p: F.layer_norm(t, (dim,), state[p + ".weight"], state[p + ".bias"], eps=1e-6)  # noqa: E731
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for i in range(depth):
        p = f"blocks.{i}."
        qkv = F.linear(ln(z, p + "norm1"), state[p + "attn.qkv.weight"], state[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b, z.shape[1], 3, heads, 64).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1) @ v
        a = F.linear(attn.transpose(1, 2).reshape(b, -1, dim), state[p + "attn.proj.weight"], state[p + "attn.proj.bias"])
        z = z + (a * state[p + "ls1.gamma"] if layerscale else a)
        y = ln(z, p + "norm2")
        if swiglu:
            x1, x2 = F.linear(y, state[p + "mlp.w12.weight"], state[p + "mlp.w12.bias"]).chunk(2, -1)
            m = F.linear(F.silu(x1) * x2, state[p + "mlp.w3.weight"], state[p + "mlp.w3.bias"])
        else:
            m = F.linear(F.gelu(F.linear(y, state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"])),
                         state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])
        z = z + (m * state[p + "ls2.gamma"] if layerscale else m)
    out = ln(z, "norm")[:, 1 + registers:]
    return out.transpose(1, 2).reshape(b, dim, rows, cols)


CASES = {
    "dino": {},
    "dinov2": {"layerscale": True},
    "dinov2-reg": {"layerscale": True, "registers": 4},
    "dinov2-g": {"layerscale": True, "swiglu": True},
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("size", [(16, 16), (12, 20)])  # the training grid (4 x 4), and another
def test_matches_the_definition(name, size, device):
    options = CASES[name]
    state = vit_state(dim=128, **options)
    model = VisionTransformer.from_state_dict(state).to(device)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        found = model(x.to(device), (2,))[2].cpu()
    registers = options.get("registers", 0)
    expected = _reference(state, x, registers=registers, layerscale=options.get("layerscale", False),
                          swiglu=options.get("swiglu", False), offset=0.0 if registers else 0.1, antialias=bool(registers))
    assert found.shape == (2, 128, size[0] // 4, size[1] // 4)
    assert torch.allclose(found, expected, atol=TOL * 10, rtol=TOL * 10)


def test_training_grid_keeps_the_position_embedding_unchanged():
    state = vit_state()
    model = VisionTransformer.from_state_dict(state)
    assert torch.equal(model._positions(4, 4), state["pos_embed"])
    assert model._positions(3, 5).shape == (1, 16, 64)


def test_intermediate_blocks_and_checkpoint_prefixes():
    state = {f"module.backbone.{k}": v for k, v in vit_state(depth=3).items()}
    model = VisionTransformer.from_state_dict(state)
    out = model(torch.zeros(1, 3, 8, 8), (1, 3))
    assert set(out) == {1, 3} and out[1].shape == (1, 64, 2, 2)
    with pytest.raises(ValueError, match="blocks 1..3"):
        model(torch.zeros(1, 3, 8, 8), (4,))
    with pytest.raises(ValueError, match="multiple of the patch size 4"):
        model(torch.zeros(1, 3, 9, 8), (1,))


def test_rejects_a_state_dict_that_is_not_a_vit():
    with pytest.raises(ValueError, match="no 'patch_embed.proj.weight'"):
        VisionTransformer.from_state_dict({"cls_token": torch.zeros(1, 1, 64)})
    broken = vit_state()
    del broken["blocks.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match="lacks"):
        VisionTransformer.from_state_dict(broken)
