"""The one float32 rounding the CRF code needs in Python: a number as a C ``float`` literal."""
from __future__ import annotations

import numpy as np


def f32(value: float) -> float:
    """``value`` rounded to float32, as a Python float (what a C ``...f`` literal or a ``float``
    store of pydensecrf holds)."""
    return float(np.float32(value))
