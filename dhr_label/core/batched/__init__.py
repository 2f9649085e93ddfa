"""DHR for many images at once, in torch, on any device: the stages of ``core.pipeline``, batched.

:func:`refine_batch` is the whole of DHR on a batch — Step-1 OT, both upsamplings, both
DenseCRFs (the torch backend: one permutohedral lattice per kernel for the batch, built once
and reused by both passes), integration, Steps 2-3 and the argmax — with no file in sight: it
is what ``refine --device cuda`` runs between its readers and writers, and what a training
loop calls to renew its pseudo-masks online (the paper's Sec. 3.3).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ...params import DHRParams
from ..checks import check_batch_inputs
from ..crf import batch_crf
from ..pipeline import ImageState, Stage, advance, start
from .stages import final_mask, heat_maps_stage, seed_mask, seed_scores

STAGES = {
    Stage.SEED_SCORES: seed_scores,
    Stage.SEED_MASK: seed_mask,
    Stage.HEAT_MAPS: heat_maps_stage,
    Stage.FINAL_MASK: final_mask,
}
ORDER = list(Stage)


def run_batch(states: list[ImageState], params: DHRParams, device) -> list[ImageState]:
    """Run every state (from :func:`~dhr_label.core.pipeline.start`) to its mask.

    The states move together: at each step the earliest pending stage runs for all the states
    waiting at it. The CRFs of a group of images are built once and reused by its second pass
    (rebuilt only for the subset that goes on when some image stopped after Step 1).
    Seconds per stage are shared out equally among the states of the group.
    """
    crfs: dict[tuple[int, ...], object] = {}

    def crf_for(group: list[ImageState]):
        key = tuple(id(s) for s in group)
        if key not in crfs:
            crfs.clear()  # an earlier group's lattices are not needed again
            crfs[key] = batch_crf([s.image for s in group], params.crf, device)
        return crfs[key]

    while True:
        pending = [s for s in states if s.next is not None]
        if not pending:
            return states
        stage = min((s.next for s in pending), key=ORDER.index)
        group = [s for s in pending if s.next is stage]
        t = time.perf_counter()
        needs_crf = stage is Stage.FINAL_MASK or (stage is Stage.SEED_MASK and params.steps.crf)
        STAGES[stage](group, params, device, crf_for(group) if needs_crf else None)
        share = (time.perf_counter() - t) / len(group)
        for s in group:
            s.timings[stage.value] = s.timings.get(stage.value, 0.0) + share
            advance(s, params)


def refine_batch(
    cams: list,
    labels: list,
    images: list,
    *,
    bases: list | None = None,
    uss: list | None = None,
    wss: list | None = None,
    background: int | None,
    params: DHRParams = DHRParams(),
    device=None,
    prototypes=None,
) -> list[ImageState]:
    """DHR for a batch of images given as tensors (or arrays); masks on the device.

    Parameters
    ----------
    cams : list of tensor, each (K_b, h_b, w_b)
        Raw CAMs of each image, one channel per tag.
    labels : list of tensor or array, each (K_b,)
        The tags (foreground class ids, ascending).
    images : list of tensor, each (H_b, W_b, 3), uint8
    bases : list of tensor, each (H_b, W_b), uint8, optional
        M_base (255 = ignore); without, M_init is the Step-1 seed.
    uss : list of tensor, each (D, h_u, w_u), optional
        USS features (Step 2; rows 5 and 7).
    wss : list of list of tensor, optional
        WSS layers of each image (Step 3; rows 6 and 7).
    background : int or None
        The dataset's background class id.
    params : DHRParams
        ``params.crf.backend`` should be ``torch`` on a GPU.
    device : torch.device, optional
        Default: the device of ``cams[0]``.
    prototypes : Prototypes, optional
        Dataset-level class prototypes (:mod:`dhr_label.core.prototypes`, numpy), blended
        into the Step 2/3 centroids with ``params.prototype_weight``.

    Returns
    -------
    list of ImageState
        ``state.mask`` is the H x W uint8 mask on ``device``; ``init``, ``restored``,
        ``groups``, ``confidence`` and ``warnings`` are filled in on the way.

    Raises
    ------
    ValueError
        For inputs the command line would refuse (:func:`~dhr_label.core.checks.check_image_inputs`),
        naming the image, the argument, expected vs found.

    Examples
    --------
    >>> states = refine_batch(cams, labels, images, bases=bases, uss=uss, wss=wss,
    ...                       background=0, params=DHRParams(crf=CRFParams(backend="torch")))
    >>> masks = torch.stack([s.mask for s in states])  # doctest: +SKIP
    """
    check_batch_inputs(cams, labels, images, bases=bases, uss=uss, wss=wss, background=background, params=params,
                       prototypes=prototypes)
    device = torch.device(device) if device is not None else cams[0].device
    n = len(cams)
    states = [
        start(ImageState(
            cams[b], _host_labels(labels[b]), images[b], None if bases is None else bases[b],
            None if uss is None else uss[b], None if wss is None else wss[b], background, prototypes,
        ), params)
        for b in range(n)
    ]
    return run_batch(states, params, device)


def _host_labels(labels) -> np.ndarray:
    return np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)


__all__ = ["refine_batch", "run_batch"]
