"""The vision transformer of DINO (v1) and DINOv2, built from an official state dict.

``dhr-label features`` loads the released DINO / DINOv2 weights into this module instead of
running the hub's code: the architecture is read off the state dict's shapes (patch size, width,
depth, register tokens, LayerScale, MLP or SwiGLU feed-forward), the heads are 64 wide as in every
released model. What matches the official implementations (Caron et al., ICCV 2021; Oquab et al.,
TMLR 2024; Darcet et al., ICLR 2024 for the registers):

- tokens: the class token, the patch embeddings plus the position embedding (bicubically
  interpolated to the image's patch grid, unchanged when the grid is the training one), then the
  register tokens (DINOv2 ``_reg`` models, after the position embedding as in the release);
- the interpolation: DINO and DINOv2 scale by ``(grid + 0.1) / M`` without anti-aliasing, the
  register models resize to the grid with anti-aliasing (the hub's settings of each);
- every block is pre-norm attention and feed-forward, LayerNorm eps 1e-6, LayerScale when the
  weights have it; an intermediate block's tokens go through the final norm, as the releases'
  ``get_intermediate_layers`` do (the DHR release's USS features are the last block's, normed).
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn
from torch.nn import functional as F

HEAD_DIM = 64
LN_EPS = 1e-6
#: DINO and DINOv2 take [0, 1] RGB normalised with ImageNet's mean and std.
INPUT_MEAN = (0.485, 0.456, 0.406)
INPUT_STD = (0.229, 0.224, 0.225)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head dim)) v
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _SwiGLU(nn.Module):
    """DINOv2 ViT-g's feed-forward: ``w3(silu(x1) * x2)`` with ``x1, x2 = w12(x)``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class _LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class _Block(nn.Module):
    def __init__(self, dim: int, hidden: int, swiglu: bool, layerscale: bool):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=LN_EPS), nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = _Attention(dim, dim // HEAD_DIM)
        self.mlp = _SwiGLU(dim, hidden) if swiglu else _Mlp(dim, hidden)
        self.ls1 = _LayerScale(dim) if layerscale else nn.Identity()
        self.ls2 = _LayerScale(dim) if layerscale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """A DINO / DINOv2 ViT; :meth:`from_state_dict` builds it, ``forward`` gives patch feature maps."""

    def __init__(self, *, dim: int, depth: int, patch: int, positions: int, hidden: int, registers: int,
                 swiglu: bool, layerscale: bool):
        super().__init__()
        self.patch_size, self.dim, self.depth, self.registers = patch, dim, depth, registers
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, positions + 1, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, registers, dim)) if registers else None
        self.blocks = nn.ModuleList(_Block(dim, hidden, swiglu, layerscale) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        # the hub's interpolation settings: DINO / DINOv2 offset 0.1; register models size + antialias
        self.interpolate_offset = 0.0 if registers else 0.1
        self.interpolate_antialias = bool(registers)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "VisionTransformer":
        """Build the ViT from an official DINO / DINOv2 backbone state dict and load it.

        Prefixes of training checkpoints (``module.``, ``backbone.``) and FSDP block chunks
        (``blocks.0.3.`` for block 3) are accepted; DINOv2's ``mask_token`` and a classifier
        ``head`` are not needed and ignored.

        Raises
        ------
        ValueError
            When the keys or shapes are not a ViT's (names what is missing).
        """
        state = _normalised_keys(state)
        for key in ("patch_embed.proj.weight", "cls_token", "pos_embed", "norm.weight", "blocks.0.attn.qkv.weight"):
            if key not in state:
                raise ValueError(f"not a DINO / DINOv2 ViT state dict: no {key!r}")
        dim, _, patch, _ = state["patch_embed.proj.weight"].shape
        if dim % HEAD_DIM:
            raise ValueError(f"ViT width {dim} is not a multiple of the {HEAD_DIM}-wide heads of DINO's models")
        depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
        positions = state["pos_embed"].shape[1] - 1
        if math.isqrt(positions) ** 2 != positions:
            raise ValueError(f"pos_embed holds {positions} patch positions, expected a square grid")
        swiglu = "blocks.0.mlp.w12.weight" in state
        hidden = state["blocks.0.mlp.w3.weight"].shape[1] if swiglu else state["blocks.0.mlp.fc1.weight"].shape[0]
        registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
        model = cls(dim=dim, depth=depth, patch=patch, positions=positions, hidden=hidden, registers=registers,
                    swiglu=swiglu, layerscale="blocks.0.ls1.gamma" in state)
        wanted = {k: v for k, v in state.items() if k not in ("mask_token",) and not k.startswith("head.")}
        missing, unexpected = model.load_state_dict(wanted, strict=False)
        if missing or unexpected:
            problem = f"lacks {missing[:3]}" if missing else f"has unknown tensors {unexpected[:3]}"
            raise ValueError(f"ViT state dict {problem}")
        return model.eval()

    def _positions(self, rows: int, cols: int) -> torch.Tensor:
        """The position embedding for a ``rows x cols`` patch grid (class token's first)."""
        side = math.isqrt(self.pos_embed.shape[1] - 1)
        if rows == side and cols == side:
            return self.pos_embed
        grid = self.pos_embed[:, 1:].float().reshape(1, side, side, self.dim).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            scale = ((rows + self.interpolate_offset) / side, (cols + self.interpolate_offset) / side)
            grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=self.interpolate_antialias)
        else:
            grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", antialias=self.interpolate_antialias)
        grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, self.dim).to(self.pos_embed.dtype)
        return torch.cat([self.pos_embed[:, :1], grid], dim=1)

    def forward(self, x: torch.Tensor, layers: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """Patch features ``{block: [B, D, H / p, W / p]}`` after the final norm, blocks 1-based.

        ``x`` is ``[B, 3, H, W]`` normalised with :data:`INPUT_MEAN` / :data:`INPUT_STD`, H and W
        multiples of the patch size.
        """
        b, _, height, width = x.shape
        rows, cols = height // self.patch_size, width // self.patch_size
        if rows * self.patch_size != height or cols * self.patch_size != width:
            raise ValueError(f"image {height} x {width} is not a multiple of the patch size {self.patch_size}")
        bad = [n for n in layers if not 1 <= n <= self.depth]
        if bad:
            raise ValueError(f"ViT block(s) {bad} out of range: this model has blocks 1..{self.depth}")
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1) + self._positions(rows, cols)
        if self.register_tokens is not None:
            tokens = torch.cat([tokens[:, :1], self.register_tokens.expand(b, -1, -1), tokens[:, 1:]], dim=1)
        out: dict[int, torch.Tensor] = {}
        skip = 1 + self.registers
        for index, block in enumerate(self.blocks[: max(layers)], start=1):
            tokens = block(tokens)
            if index in layers:
                patches = self.norm(tokens)[:, skip:]
                out[index] = patches.transpose(1, 2).reshape(b, self.dim, rows, cols)
        return out


def _normalised_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip training-wrapper prefixes and FSDP chunk indices from the keys."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone."):
            key = key.removeprefix(prefix)
        key = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)
        out[key] = value
    return out
