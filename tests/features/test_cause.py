"""The CAUSE head against a transcription of the DHR release's decoder, written out with matrices."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers_weights import cause_checkpoint

from dhr_label.features.cause import cause_from_checkpoint

TOL = 1e-5  # float32, one decoder layer


def _attention(q, k, v, w, b, wo, bo):
    """Single-head attention over [P, D] sequences: softmax(q Wq (k Wk)^T / sqrt(D)) v Wv, then Wo."""
    d = q.shape[-1]
    wq, wk, wv = w.chunk(3)
    bq, bk, bv = b.chunk(3)
    a = torch.softmax((q @ wq.T + bq) @ (k @ wk.T + bk).T / d ** 0.5, dim=-1)
    return (a @ (v @ wv.T + bv)) @ wo.T + bo


def _reference(checkpoint, features):
    s = {k.removeprefix("head_ema.").removeprefix("tr."): v for k, v in checkpoint["decoder"].items()}
    book = checkpoint["codebook"]
    d, h, w = features.shape
    f = features.flatten(1).T  # [P, D]
    t = book[(F.normalize(f, dim=1) @ F.normalize(book, dim=1).T).argmax(1)]
    # query_pos [Q, D] resampled linearly along the sequence to P (align_corners False)
    pe = F.interpolate(s["query_pos"].T[None], size=h * w, mode="linear")[0].T
    ln = lambda x, n: F.layer_norm(x, (d,), s[n + ".weight"], s[n + ".bias"])  # noqa: E731
    att = lambda n, q, k, v: _attention(q, k, v, s[n + ".in_proj_weight"], s[n + ".in_proj_bias"],  # noqa: E731
                                        s[n + ".out_proj.weight"], s[n + ".out_proj.bias"])
    t = ln(t + att("self_attn", t + pe, t + pe, t), "norm1")
    t = ln(t + att("multihead_attn", t + pe, f, f), "norm2")
    t = f + ln(t + F.linear(F.relu(F.linear(t, s["linear1.weight"], s["linear1.bias"])), s["linear2.weight"], s["linear2.bias"]), "norm3")
    grid = t.T.reshape(1, d, h, w)
    f2 = F.conv2d(F.relu(F.conv2d(grid, s["f2.0.weight"], s["f2.0.bias"])), s["f2.2.weight"], s["f2.2.bias"])
    return (F.conv2d(grid, s["f1.weight"], s["f1.bias"]) + f2)[0]


def test_matches_the_release_decoder():
    checkpoint = cause_checkpoint()
    head = cause_from_checkpoint(checkpoint)
    features = torch.randn(2, 64, 3, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        found = head(features)
    assert found.shape == (2, 5, 3, 4)
    for i in range(2):
        assert torch.allclose(found[i], _reference(checkpoint, features[i]), atol=TOL, rtol=TOL)


def test_rejects_other_layouts():
    with pytest.raises(ValueError, match="expected 'decoder' and 'codebook'"):
        cause_from_checkpoint({"cluster1": {}})
    broken = cause_checkpoint()
    broken["codebook"] = torch.zeros(4, 10)
    with pytest.raises(ValueError, match=r"codebook: expected \[K, 64\]"):
        cause_from_checkpoint(broken)
