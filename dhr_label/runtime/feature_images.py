"""Where ``features`` reads its images: the cams file's ``image`` datasets, or an image folder.

With a cams file the ids are its groups (and ``--images DIR``, when given, supplies the pictures,
as in ``refine``); with a folder alone the ids are its ``<id>.jpg|.jpeg|.png`` files.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import FileLevelError, InputError
from ..io.contract import CamsFile
from ..io.ids import IMAGE_SUFFIXES, is_valid_id
from ..io.inputs import find_image, load_image_file


class ImageSource:
    """The images of a run; :meth:`read` gives one as ``[H, W, 3]`` uint8 (conversions noted)."""

    def __init__(self, cams: Path | None, images: Path | None, *, handle=None):
        """``handle``: the cams file already open (for writing, when it is also the output)."""
        if cams is None and images is None:
            raise FileLevelError("no images: give --cams FILE (its image datasets) and/or --images DIR")
        if images is not None and not Path(images).is_dir():
            raise FileLevelError(f"--images {images} is not a directory")
        self.images = Path(images) if images is not None else None
        self._owned = handle is None
        if cams is None:
            self.cams = None
        elif handle is None:
            self.cams = CamsFile.open(Path(cams))
        else:
            self.cams = CamsFile(Path(cams), handle)

    def close(self) -> None:
        if self.cams is not None and self._owned:
            self.cams.close()

    def __enter__(self) -> "ImageSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def ids(self) -> list[str]:
        """The ids of the run, sorted."""
        if self.cams is not None:
            return self.cams.ids()
        stems = sorted({p.stem for p in self.images.iterdir()
                        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and is_valid_id(p.stem)})
        if not stems:
            raise FileLevelError(f"--images {self.images} holds no <id>.jpg|.jpeg|.png file")
        return stems

    def describe(self) -> dict:
        """Where the pictures come from (part of the run's settings)."""
        if self.images is not None:
            return {"source": "folder", "path": str(self.images)}
        return {"source": "cams", "path": str(self.cams.path)}

    def read(self, image_id: str, notes: list[str]) -> np.ndarray:
        """One image; raises :class:`InputError` naming the id and file when it cannot be had."""
        if self.images is not None:
            path = find_image(self.images, image_id)
            if path is None:
                raise InputError(image_id, str(self.images), f"no image {image_id}.jpg|.jpeg|.png in this directory")
            return load_image_file(path, image_id, notes)
        image = self.cams.read_image(image_id, notes)
        if image is None:
            raise InputError(image_id, f"{self.cams.path}:/{image_id}/image", "no image in the cams file and no --images directory given")
        return image
