"""STEGO heads from both checkpoint layouts, read without running code from the file."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers_weights import stego_head, vit_state

from dhr_label.features.checkpoints import Opaque, load_weights
from dhr_label.features.stego import head_from_state_dict, split_checkpoint

TOL = 1e-6


class Config:
    """Stands for the OmegaConf objects in a Lightning checkpoint's hyper_parameters."""

    ran = False

    def __setstate__(self, state):
        Config.ran = True  # unpickling a real Config would run this
        self.__dict__.update(state)


def test_dhr_release_layout_computes_cluster1_plus_cluster2(tmp_path):
    checkpoint = stego_head()
    torch.save(checkpoint, tmp_path / "STEGO_VOC2012.pt")
    head_state, backbone = split_checkpoint(load_weights(tmp_path / "STEGO_VOC2012.pt"))
    head = head_from_state_dict(head_state)
    x = torch.randn(2, 64, 3, 5, generator=torch.Generator().manual_seed(0))
    c1, c2 = checkpoint["cluster1"], checkpoint["cluster2"]
    expected = F.conv2d(x, c1["0.weight"], c1["0.bias"]) + F.conv2d(
        F.relu(F.conv2d(x, c2["0.weight"], c2["0.bias"])), c2["2.weight"], c2["2.bias"])
    with torch.no_grad():
        assert torch.allclose(head(x), expected, atol=TOL)
    assert backbone is None and head.code == 7


def test_lightning_checkpoint_gives_head_and_backbone_without_unpickling_its_objects(tmp_path):
    head = stego_head()
    state = {f"net.{name}.{k}": v for name in ("cluster1", "cluster2") for k, v in head[name].items()}
    state.update({f"net.model.{k}": v for k, v in vit_state().items()})
    state["linear_probe.weight"] = torch.zeros(27, 7, 1, 1)
    config = Config()
    config.dim = 7
    torch.save({"state_dict": state, "hyper_parameters": {"cfg": config}}, tmp_path / "stego.ckpt")
    Config.ran = False
    loaded = load_weights(tmp_path / "stego.ckpt")
    assert not Config.ran  # the class named in the file was never imported nor called
    assert isinstance(loaded["hyper_parameters"]["cfg"], Opaque)
    head_state, backbone = split_checkpoint(loaded)
    assert set(head_state) == {"cluster1.0.weight", "cluster1.0.bias", "cluster2.0.weight", "cluster2.0.bias",
                               "cluster2.2.weight", "cluster2.2.bias"}
    assert torch.equal(backbone["pos_embed"], vit_state()["pos_embed"])


def test_malicious_pickle_is_not_run(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (exec, ("import pathlib; pathlib.Path('pwned').touch()",))

    path = tmp_path / "bad.pt"
    torch.save({"x": torch.zeros(1), "y": Exploit()}, path)
    loaded = load_weights(path)
    assert not (tmp_path / "pwned").exists() and not __import__("pathlib").Path("pwned").exists()
    assert isinstance(loaded["y"], Opaque)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello")
    with pytest.raises(ValueError, match="not a"):
        load_weights(path)
    with pytest.raises(ValueError, match="not a STEGO checkpoint"):
        split_checkpoint({"model": {}})
