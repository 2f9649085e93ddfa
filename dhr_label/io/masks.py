"""Label masks as 8-bit PNG files whose pixel values are class ids."""
from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from .atomic import write_bytes_atomic

#: The PNG text key under which a mask records the fingerprint of the settings that made it.
PROVENANCE_KEY = "dhr-label"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def encode_mask(mask: np.ndarray, palette, *, provenance: str | None = None) -> bytes:
    """PNG bytes of ``mask`` (H x W uint8 class ids) as a palette image.

    ``provenance`` is stored as a text chunk (readers of the mask ignore it). The encoding is
    deterministic: the same mask, palette and provenance give the same bytes.
    """
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"mask must be a 2-D uint8 array, got {mask.dtype} of shape {mask.shape}")
    image = Image.fromarray(np.ascontiguousarray(mask), mode="P")
    image.putpalette(list(palette))
    info = None
    if provenance is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text(PROVENANCE_KEY, provenance)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6, pnginfo=info)
    return buffer.getvalue()


def write_mask(path: Path, mask: np.ndarray, palette, *, provenance: str | None = None) -> None:
    """Write ``mask`` to ``path`` atomically as a palette PNG."""
    write_bytes_atomic(Path(path), encode_mask(mask, palette, provenance=provenance))


def read_provenance(path: Path) -> str | None:
    """The fingerprint a dhr-label mask records (None for any other PNG, or an unreadable one).

    Reads only the chunks before the image data (a few KB), ~10x faster than opening the
    image: a resumed run checks every existing mask.
    """
    try:
        with open(path, "rb") as handle:
            if handle.read(8) != _PNG_SIGNATURE:
                return None
            while True:
                header = handle.read(8)
                if len(header) < 8:
                    return None
                length, kind = struct.unpack(">I4s", header)
                if kind in (b"IDAT", b"IEND"):
                    return None
                data = handle.read(length)
                handle.seek(4, io.SEEK_CUR)  # the CRC
                if kind == b"tEXt":
                    key, _, value = data.partition(b"\0")
                    if key == PROVENANCE_KEY.encode():
                        return value.decode("latin-1")
    except OSError:
        return None


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
