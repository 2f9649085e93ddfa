"""The scheduler of the stages: a batch of states moved through :mod:`.pipeline`'s stages.

Both executors of ``refine`` are schedulers of this one loop: a CPU worker runs it on a batch
of one image (its CRF pydensecrf or the torch one), the device executor on a batch of many
(the torch CRF, one lattice per kernel for the batch). The maths is in the stages
(:mod:`.seed`, :mod:`.rebalance`), the decisions in :mod:`.pipeline`.
"""
from __future__ import annotations

import time

import torch

from ..params import CRFParams, DHRParams
from .crf import ImageCRFs, image_crfs
from .pipeline import ImageState, Stage, advance
from .rebalance import final_mask, rebalance_heat
from .seed import seed_mask, seed_scores

STAGES = {
    Stage.SEED_SCORES: seed_scores,
    Stage.SEED_MASK: seed_mask,
    Stage.HEAT_MAPS: rebalance_heat,
    Stage.FINAL_MASK: final_mask,
}
ORDER = list(Stage)


class CRFCache:
    """The DenseCRFs of the last group of images, kept for the next call with the same images.

    DHR's two passes over an image share its lattices; ``dhr-label tune`` keeps an image's
    CRF for every variant with the same CRF parameters. Keyed by the image tensors' identity.
    """

    def __init__(self, params: CRFParams):
        self.params = params
        self._key: tuple | None = None
        self._crfs: ImageCRFs | None = None

    def get(self, images: list[torch.Tensor]) -> ImageCRFs:
        key = tuple(id(image) for image in images)
        if key != self._key:
            self._crfs = None  # an earlier group's lattices are not needed again: free them first
            self._crfs, self._key = image_crfs(images, self.params, images[0].device), key
        return self._crfs


def run_stages(
    states: list[ImageState], params: DHRParams, *, crfs: CRFCache | None = None, until: Stage | None = None
) -> list[ImageState]:
    """Run every state (from :func:`~.pipeline.start` or :func:`~.pipeline.resume`) to its mask.

    The states move together: at each step the earliest pending stage runs for all the states
    waiting at it. ``until``: stop before that stage (``tune`` runs Step 1 alone with
    ``until=Stage.HEAT_MAPS``). Seconds per stage go to ``state.timings``, shared out equally
    among the states of the group (measured after the device finished the stage's work).
    States without an image (Steps 2-3 alone, :func:`~.dhr.rebalance`) take the argmax
    instead of the CRF.
    """
    crfs = crfs or CRFCache(params.crf)
    stop = ORDER.index(until) if until is not None else len(ORDER)
    while True:
        pending = [s for s in states if s.next is not None and ORDER.index(s.next) < stop]
        if not pending:
            return states
        stage = min((s.next for s in pending), key=ORDER.index)
        group = [s for s in pending if s.next is stage]
        t = time.perf_counter()
        needs_crf = stage is Stage.FINAL_MASK or (stage is Stage.SEED_MASK and params.steps.crf)
        with_image = all(s.image is not None for s in group)
        STAGES[stage](group, params, crfs.get([s.image for s in group]) if needs_crf and with_image else None)
        _synchronise(group[0].device)
        share = (time.perf_counter() - t) / len(group)
        for s in group:
            s.timings[stage.value] = s.timings.get(stage.value, 0.0) + share
            advance(s, params)


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
