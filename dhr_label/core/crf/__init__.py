"""DenseCRF R_C (Krähenbühl & Koltun 2011) as DHR uses it: the pydensecrf wrapper."""
from __future__ import annotations

from .pydense import ImageCRF

__all__ = ["ImageCRF"]
