"""dhr-label: DHR (ECCV 2024) refinement of weakly-supervised pseudo-masks, offline."""
from __future__ import annotations

__version__ = "0.1.0"

from .params import CapMode, CRFParams, DHRParams, Marginal, OTParams, Steps  # noqa: E402
from .io.writer import Writer  # noqa: E402

__all__ = ["__version__", "CapMode", "CRFParams", "DHRParams", "Marginal", "OTParams", "Steps", "Writer"]
