"""DHR's public entry points: one image with numpy arrays, or a batch of tensors on any device.

Both are thin: they build the states of :mod:`.pipeline` and hand them to the one scheduler
(:func:`.stages.run_stages`), which a CPU worker of ``dhr-label refine`` runs on one image and
the device executor on a batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..params import DHRParams
from .checks import check_batch_inputs, check_image_inputs
from .pipeline import ImageState, Stage, class_counts, new_state, resume, start
from .prototypes import Prototypes
from .stages import run_stages
from .tensors import to_device, to_host

__all__ = ["Refinement", "rebalance", "refine_batch", "refine_image"]


@dataclass(frozen=True)
class Refinement:
    """What DHR made of one image, as numpy arrays.

    Attributes
    ----------
    mask : ndarray, shape (H, W), uint8
        The output (M_base, M_init or M_dh by ablation row); 255 = ignore.
    init, seed : ndarray, shape (H, W), uint8, or None
        M_init and M_seed (None for row 1, or when Step 1 did not run).
    restored : list of int
        The tags Step 1 restored into the base mask.
    classes : ndarray of int, or None
        Gamma of Steps 2-3 (None when they did not run).
    groups : list of list of int
        The WSS groups of Step 3 (class ids).
    confidence : ndarray, shape (H, W), float32, or None
        The final DenseCRF's maximum marginal per pixel.
    warnings : list of str
        E.g. an OT that did not converge.
    timings : dict
        Seconds per stage.
    """

    mask: np.ndarray
    init: np.ndarray | None
    seed: np.ndarray | None
    restored: list[int]
    classes: np.ndarray | None
    groups: list[list[int]]
    confidence: np.ndarray | None
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, state: ImageState) -> "Refinement":
        """The numpy view of a finished state."""

        def host(tensor):
            return None if tensor is None else to_host(tensor)

        return cls(host(state.mask), host(state.init), host(state.seed), list(state.restored), state.classes,
                   [list(g) for g in state.groups], host(state.confidence), list(state.warnings), dict(state.timings))


def refine_image(
    cam: np.ndarray,
    labels: np.ndarray,
    *,
    image: np.ndarray,
    base: np.ndarray | None,
    uss: np.ndarray | None,
    wss: list[np.ndarray] | None,
    background: int | None,
    params: DHRParams,
    prototypes: Prototypes | None = None,
) -> Refinement:
    """DHR for one image on the CPU: Step 1 (seed, integration), Steps 2-3 (rebalancing), as
    ``params.steps`` says; what a CPU worker of ``dhr-label refine`` runs for each image.

    Parameters
    ----------
    cam : ndarray, shape (K, h, w)
        Raw CAMs, channel k for ``labels[k]``.
    labels : ndarray, shape (K,)
        Foreground tags, ascending.
    image : ndarray, shape (H, W, 3), uint8
    base : ndarray, shape (H, W), uint8, optional
        M_base; 255 = ignore. Required for Table 6 row 1.
    uss : ndarray, shape (D, h_u, w_u), optional
        Needed when ``params.steps.uss``.
    wss : list of ndarray, each (D_l, h_l, w_l), optional
        Needed when ``params.steps.wss``.
    background : int or None
        Background class id of the dataset.
    params : DHRParams
    prototypes : Prototypes, optional
        Dataset-level class prototypes (:mod:`~.prototypes`), blended into the Step 2/3
        centroids with ``params.prototype_weight``; without them the centroids are the
        image's own (the paper's). ``dhr-label refine`` pools them from the base masks of every
        image of the cams file: pass the same ones to get its masks.

    Returns
    -------
    Refinement
        ``mask`` (H x W uint8), and on the way ``init`` (M_init), ``seed``, ``restored``,
        ``groups``, ``confidence``, ``timings``.

    Raises
    ------
    ValueError
        For inputs the command line would refuse (:func:`~.checks.check_image_inputs`), naming
        the argument, expected vs found.
    """
    check_image_inputs(cam, labels, image=image, base=base, uss=uss, wss=wss, background=background, params=params,
                       prototypes=prototypes)
    state = start(new_state(cam, labels, image, base, uss, wss, background, prototypes, device="cpu"), params)
    return Refinement.of(run_stages([state], params)[0])


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
    prototypes: Prototypes | None = None,
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
    device = torch.device(device) if device is not None else torch.as_tensor(cams[0]).device
    n = len(cams)

    def nth(values, b):
        return None if values is None else values[b]

    states = [start(new_state(cams[b], labels[b], images[b], nth(bases, b), nth(uss, b), nth(wss, b), background, prototypes,
                              device=device), params) for b in range(n)]
    return run_stages(states, params)


def rebalance(
    init: np.ndarray,
    *,
    uss: np.ndarray | None,
    wss: list[np.ndarray] | None,
    params: DHRParams,
    image: np.ndarray | None = None,
    prototypes: Prototypes | None = None,
) -> Refinement:
    """Steps 2-3 alone, from a given M_init (rows 5-7), on the CPU; without ``image`` the final
    mask is the argmax of the heat maps instead of the CRF's.

    The same decisions as :func:`refine_image` after Step 1: one class or one feature cell keeps
    M_init.
    """
    if params.steps.needs_uss and uss is None or params.steps.needs_wss and not wss:
        raise ValueError("Steps 2/3 need USS features (rows 5 and 7) or WSS features (row 6)")
    state = new_state(None, np.zeros(0, np.int64), image, None, uss, wss, None, prototypes, device="cpu")
    state.init = to_device(init, "cpu")
    state.init_counts, state.next = class_counts(state.init), Stage.SEED_MASK
    state = resume(state, params)
    return Refinement.of(run_stages([state], params)[0])
