"""Step 1 of DHR: OT-based seed initialisation and recovery of vanished classes (Eq. 2).

Two stages over a batch of states (:mod:`.pipeline`): SEED_SCORES (``A * f_OT(A)`` on the CAM
grid) and SEED_MASK (upsampling, the first DenseCRF, M_seed, integration into the base mask).
"""
from __future__ import annotations

import numpy as np
import torch

from ..params import DHRParams
from .crf import ImageCRFs
from .ot import transport
from .pipeline import ImageState, seed_transport
from .resize import resize
from .tensors import pad_stack, to_host


def seed_scores(states: list[ImageState], params: DHRParams, crfs: ImageCRFs | None = None) -> None:
    """Step 1.1-1.2: ReLU, per-channel max normalisation, then ``A * f_OT(A)`` over the cells.

    Fills ``state.scores`` (K x h x w in [0, 1]); f_OT is skipped when OT is off or K = 1
    (:func:`~.pipeline.seed_transport`).
    """
    device = states[0].device
    a, shapes = pad_stack([s.cam.reshape(len(s.labels), -1) for s in states], device)  # [B, K, N]; padding 0
    a = a.clamp(min=0.0)
    a = a / a.amax(dim=2, keepdim=True).clamp(min=1e-5)
    scores = [a[b, :k, :n] for b, (k, n) in enumerate(shapes)]
    values, notes = transport(scores, [seed_transport(s, params) for s in states], params.ot, params.marginal_kl)
    for s, score, value, note in zip(states, scores, values, notes):
        s.scores = (score * value).reshape(s.cam.shape)
        s.warnings += [note] if note else []


def seed_channels(
    scores: torch.Tensor, labels: np.ndarray, background: int | None, size: tuple[int, int], gamma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1.3: the channels of the first CRF and the class id of each.

    The scores upsampled to the image (bilinear), after ``bg_score = (1 - max_k A_k) ** gamma``
    (CLIP-ES) when the dataset has a background: C x H x W float32 and C class ids (int64).
    float32 from the upsampling on: every value is local to a pixel (no sum over a padded
    axis), and it is what the CRF takes; image-sized float64 maps would double the memory.

    Examples
    --------
    >>> probs, ids = seed_channels(torch.tensor([[[0.25]]]), np.array([3]), 0, (1, 2), 1.0)
    >>> probs.tolist(), ids.tolist()
    ([[[0.75, 0.75]], [[0.25, 0.25]]], [0, 3])
    """
    up = resize(scores.to(torch.float32), size)
    ids = torch.as_tensor(labels, device=scores.device)
    if background is not None:
        bg = (1.0 - up.amax(dim=0, keepdim=True)).clamp(0.0, 1.0) ** gamma
        up = torch.cat([bg, up])
        ids = torch.cat([torch.as_tensor([background], device=scores.device), ids])
    return up, ids


def seed_mask(states: list[ImageState], params: DHRParams, crfs: ImageCRFs | None) -> None:
    """Step 1.3-1.5: M_seed (the DenseCRF's argmax over :func:`seed_channels` as class ids; the
    argmax of the channels themselves with the CRF off, Table 6 row 2) and M_init.

    Fills ``seed``, ``init``, ``restored`` and ``init_counts`` (pixels per class id of M_init,
    which Steps 2-3's decisions read: one transfer for the batch).
    """
    channels = [seed_channels(s.scores, s.labels, s.background, s.size, params.gamma) for s in states]
    probs = [p for p, _ in channels]
    marginals = crfs.marginals(probs) if params.steps.crf else probs
    lost = []
    for s, q, (_, ids) in zip(states, marginals, channels):
        s.seed = ids[q.argmax(dim=0)].to(torch.uint8)
        s.init, lost_tags = integrate(s.seed, s.base, ids[-len(s.labels):], params.rho)
        lost.append(lost_tags)
    counts = torch.stack([torch.bincount(s.init.reshape(-1).long(), minlength=256) for s in states])
    host = to_host(torch.cat([counts.reshape(-1), torch.cat(lost).long()]))
    tags_at = len(states) * 256
    for b, s in enumerate(states):
        s.init_counts = host[b * 256 : (b + 1) * 256]
        k = len(s.labels)
        s.restored = s.labels[host[tags_at : tags_at + k].astype(bool)].tolist()
        tags_at += k


def integrate(seed: torch.Tensor, base: torch.Tensor | None, tags: torch.Tensor, rho: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1.5: restore into ``base`` the tags whose seed region the base mask has lost.

    A tag k is lost when ``|{base = k} & {seed = k}| < rho * |{seed = k}|``; its seed region is
    then written into the base mask. Tags the base mask kept, and the background, are left
    untouched. Without a base mask the seed is the result.

    Parameters
    ----------
    seed, base : tensor, shape (H, W), uint8
    tags : tensor, shape (K,), int
        The image's foreground tags.
    rho : float

    Returns
    -------
    init : tensor, shape (H, W), uint8
        M_init (a new tensor).
    lost : bool tensor, shape (K,)
        The tags restored.

    Examples
    --------
    >>> seed = torch.tensor([[1, 1, 2]], dtype=torch.uint8)
    >>> base = torch.tensor([[0, 0, 2]], dtype=torch.uint8)
    >>> init, lost = integrate(seed, base, torch.tensor([1, 2]), 0.5)
    >>> init.tolist(), lost.tolist()
    ([[1, 1, 2]], [True, False])
    """
    if base is None:
        return seed.clone(), torch.zeros(len(tags), dtype=torch.bool, device=seed.device)
    ids = seed.reshape(-1).long()
    sizes = torch.bincount(ids, minlength=256)
    kept = torch.bincount(ids, weights=(base.reshape(-1) == seed.reshape(-1)).double(), minlength=256)  # exact counts
    tags = tags.to(seed.device).long()
    lost = (sizes[tags] > 0) & (kept[tags] < rho * sizes[tags].double())
    table = torch.zeros(256, dtype=torch.bool, device=seed.device)
    table[tags] = lost
    return torch.where(table[seed.long()], seed, base), lost
