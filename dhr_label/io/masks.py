"""Label masks as 8-bit PNG files whose pixel values are class ids."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from .atomic import write_bytes_atomic


def encode_mask(mask: np.ndarray, palette) -> bytes:
    """PNG bytes of ``mask`` (H x W uint8 class ids) as a palette image.

    The encoding is deterministic: the same mask and palette give the same bytes.
    """
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"mask must be a 2-D uint8 array, got {mask.dtype} of shape {mask.shape}")
    image = Image.fromarray(np.ascontiguousarray(mask), mode="P")
    image.putpalette(list(palette))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def write_mask(path: Path, mask: np.ndarray, palette) -> None:
    """Write ``mask`` to ``path`` atomically as a palette PNG."""
    write_bytes_atomic(Path(path), encode_mask(mask, palette))


def read_mask(path: Path) -> np.ndarray:
    """Class ids of a mask PNG (palette ``P`` or grey ``L``), H x W uint8.

    Raises
    ------
    ValueError
        When the file is not a single-channel 8-bit image (an RGB rendering of a mask, a
        16-bit PNG): its pixel values would not be class ids.
    OSError
        When the file cannot be read or decoded.
    """
    with Image.open(path) as image:
        if image.mode not in ("P", "L"):
            raise ValueError(
                f"expected an 8-bit palette or grey-index PNG (mode P or L), found mode {image.mode}"
            )
        return np.asarray(image, dtype=np.uint8).copy()
