"""dhr-label: DHR (ECCV 2024) refinement of weakly-supervised pseudo-masks, offline and online.

The command line is ``dhr-label``; in Python:

- :func:`refine_image` — DHR for one image, numpy arrays in and out (what a CPU worker runs);
- :func:`refine_batch` — DHR for a batch of images as torch tensors on any device (the paper's
  online use inside a training loop), masks on the device;
- :func:`dense_crf` — the batched torch DenseCRF alone, a GPU drop-in for the CRF
  post-processing of IRN / CLIP-ES / ToCo pipelines;
- :class:`DHRParams` and its parts — every parameter, with the defaults of docs/algorithm.md;
- :class:`Prototypes` — dataset-level class prototypes for Steps 2-3 (ours), pooled with
  :mod:`dhr_label.core.prototypes` (``image_sums``, ``add_sums``, ``finish``);
- :class:`Writer` — write cams.h5 / feats.h5 from your own extractor.

The torch-based entries are imported on first use, so the commands that need no torch
(``score``, ``inspect``, ...) never pay for importing it.
"""
from __future__ import annotations

from ._version import __version__  # noqa: F401
from .io.writer import Writer  # noqa: E402
from .params import CapMode, CRFBackend, CRFKernels, CRFParams, DHRParams, Marginal, OTParams, Steps  # noqa: E402

_LAZY = {"refine_image": ("core.dhr", "refine_image"), "refine_batch": ("core.dhr", "refine_batch"),
         "Refinement": ("core.dhr", "Refinement"), "Prototypes": ("core.prototypes", "Prototypes"),
         "dense_crf": ("core.crf.meanfield", "dense_crf"), "BatchCRF": ("core.crf.meanfield", "BatchCRF")}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attribute)
    raise AttributeError(f"module 'dhr_label' has no attribute {name!r}")


__all__ = ["__version__", "BatchCRF", "CapMode", "CRFBackend", "CRFKernels", "CRFParams", "DHRParams", "Marginal",
           "OTParams", "Prototypes", "Refinement", "Steps", "Writer", "dense_crf", "refine_batch", "refine_image"]
