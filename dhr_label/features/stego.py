"""The STEGO segmentation head (Hamilton et al., ICLR 2022) on DINO features.

STEGO trains, per dataset, a projection of frozen DINO patch features into a code space (70
dimensions in the released models): ``code = cluster1(f) + cluster2(f)`` with ``cluster1`` a 1x1
convolution and ``cluster2`` two 1x1 convolutions around a ReLU (the ``nonlinear`` projection of
its configuration; dropout is off at inference). The DHR release uses that code as its USS
features. Two checkpoint layouts hold the head:

- the DHR release's ``STEGO_<dataset>.pt``: ``{"cluster1": {...}, "cluster2": {...}}``;
- STEGO's own Lightning checkpoints (``cocostuff27_vit_base_5.ckpt``, ...): ``state_dict`` with
  ``net.cluster1.*``, ``net.cluster2.*`` and the DINO backbone under ``net.model.*``.
"""
from __future__ import annotations

import torch
from torch import nn


class StegoHead(nn.Module):
    """``cluster1(f) + cluster2(f)`` over ``[B, D, h, w]`` DINO features."""

    def __init__(self, dim: int, code: int, nonlinear: bool):
        super().__init__()
        self.cluster1 = nn.Sequential(nn.Conv2d(dim, code, 1))
        self.cluster2 = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.ReLU(), nn.Conv2d(dim, code, 1)) if nonlinear else None
        self.dim, self.code = dim, code

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        code = self.cluster1(features)
        return code + self.cluster2(features) if self.cluster2 is not None else code


def split_checkpoint(checkpoint) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """The head's state dict (``cluster1.*``, ``cluster2.*``) and the backbone's, if the file has it.

    Raises
    ------
    ValueError
        When neither layout is found (names the keys found).
    """
    if not isinstance(checkpoint, dict):
        raise ValueError(f"expected a dict checkpoint, found {type(checkpoint).__name__}")
    if isinstance(checkpoint.get("cluster1"), dict):
        head = {f"cluster1.{k}": v for k, v in checkpoint["cluster1"].items()}
        head.update({f"cluster2.{k}": v for k, v in (checkpoint.get("cluster2") or {}).items()})
        return head, None
    state = checkpoint.get("state_dict", checkpoint)
    if isinstance(state, dict) and any(str(k).startswith("net.cluster1.") for k in state):
        head = {k[len("net."):]: v for k, v in state.items() if k.startswith(("net.cluster1.", "net.cluster2."))}
        backbone = {k[len("net.model."):]: v for k, v in state.items() if k.startswith("net.model.")}
        return head, backbone or None
    keys = list(checkpoint)[:5]
    raise ValueError(f"not a STEGO checkpoint: expected 'cluster1' / 'cluster2' or a state_dict with net.cluster1.*, found keys {keys}")


def head_from_state_dict(state: dict[str, torch.Tensor]) -> StegoHead:
    """Build and load the head from ``cluster1.0.*`` (and ``cluster2.{0,2}.*``) tensors."""
    try:
        code, dim = state["cluster1.0.weight"].shape[:2]
    except KeyError:
        raise ValueError("STEGO head lacks cluster1.0.weight") from None
    head = StegoHead(int(dim), int(code), nonlinear="cluster2.0.weight" in state)
    missing, unexpected = head.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"STEGO head: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return head.eval()
