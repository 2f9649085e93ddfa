"""The CAUSE segmentation head (Kim et al., Pattern Recognition 2024) on DINOv2 patch tokens, as
the DHR release runs it (its ``CAUSE_<dataset>.pt``: ``decoder``, the EMA head's state dict, and
``codebook``, the concept prototypes).

Per image, with ``f`` the DINOv2 patch tokens ``[P, D]`` (last block, normed, no class token):

1. ``t = codebook[argmax_k cos(f, codebook_k)]``, each token replaced by its nearest concept;
2. the position queries ``query_pos`` ``[Q, D]`` (Q from training crops) resampled linearly along
   the token sequence to P, ``pe``;
3. one transformer decoder layer, post-norm, single-head attention (``torch.nn.MultiheadAttention``
   with the checkpoint's weights): ``t = norm1(t + SA(t + pe, t + pe, t))``,
   ``t = norm2(t + CA(t + pe, f, f))``, ``t = f + norm3(t + W2 relu(W1 t))``;
4. ``code = f1(t) + f2(t)`` on the ``h x w`` grid (1x1 convolutions; f2 with a ReLU between), the
   USS features (90 dimensions in the release).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

PREFIX = "head_ema."


class CauseHead(nn.Module):
    """The EMA decoder head of CAUSE; build it with :func:`cause_from_checkpoint`."""

    def __init__(self, dim: int, code: int, queries: int, hidden: int):
        super().__init__()
        self.query_pos = nn.Parameter(torch.zeros(queries, dim))
        self.self_attn = nn.MultiheadAttention(dim, 1)
        self.multihead_attn = nn.MultiheadAttention(dim, 1)
        self.linear1, self.linear2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.f1 = nn.Conv2d(dim, code, 1)
        self.f2 = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.ReLU(), nn.Conv2d(dim, code, 1))
        self.register_buffer("codebook", torch.zeros(1, dim))
        self.dim, self.code = dim, code

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, D, h, w]`` patch features -> ``[B, code, h, w]``."""
        b, d, h, w = features.shape
        memory = features.flatten(2).permute(2, 0, 1)  # [P, B, D]: the attention's sequence-first layout
        similarity = F.normalize(memory, dim=-1) @ F.normalize(self.codebook, dim=-1).T
        tgt = self.codebook[similarity.argmax(dim=-1)]
        pe = F.interpolate(self.query_pos.T[None], size=h * w, mode="linear")[0].T[:, None]  # [P, 1, D]
        q = tgt + pe
        tgt = self.norm1(tgt + self.self_attn(q, q, tgt, need_weights=False)[0])
        tgt = self.norm2(tgt + self.multihead_attn(tgt + pe, memory, memory, need_weights=False)[0])
        tgt = memory + self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))
        grid = tgt.permute(1, 2, 0).reshape(b, d, h, w)
        return self.f1(grid) + self.f2(grid)


def cause_from_checkpoint(checkpoint) -> CauseHead:
    """Build the head from the DHR release's ``{"decoder": state dict, "codebook": [K, D]}``.

    Raises
    ------
    ValueError
        When the layout is not that one (names what is missing).
    """
    if not isinstance(checkpoint, dict) or "decoder" not in checkpoint or "codebook" not in checkpoint:
        found = list(checkpoint)[:5] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"not a CAUSE checkpoint: expected 'decoder' and 'codebook', found {found}")
    state = {k[len(PREFIX) + len("tr."):] if k.startswith(PREFIX + "tr.") else k[len(PREFIX):]: v
             for k, v in checkpoint["decoder"].items() if k.startswith(PREFIX)}
    try:
        queries, dim = state["query_pos"].shape
        code, hidden = state["f1.weight"].shape[0], state["linear1.weight"].shape[0]
    except KeyError as exc:
        raise ValueError(f"CAUSE decoder lacks head_ema.{exc.args[0]}") from None
    head = CauseHead(dim, code, queries, hidden)
    state["codebook"] = torch.as_tensor(checkpoint["codebook"]).float()
    if state["codebook"].ndim != 2 or state["codebook"].shape[1] != dim:
        raise ValueError(f"CAUSE codebook: expected [K, {dim}], found {list(state['codebook'].shape)}")
    head.codebook = torch.zeros_like(state["codebook"])
    missing, unexpected = head.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"CAUSE decoder: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return head.eval()
