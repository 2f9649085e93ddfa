"""Everything one image needs, gathered from the HDF5 files and the directories, validated."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..core.checks import grid_problem
from ..errors import FileLevelError, InputError
from .contract import CamsFile, FeatsFile, as_rgb_uint8, check_label_map
from .masks import read_mask

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


@dataclass
class ImageInputs:
    """Validated inputs of one image; ``notes`` says what was adapted (e.g. RGBA -> RGB)."""

    image_id: str
    cam: np.ndarray  # K x h x w float32
    labels: np.ndarray  # K int64
    image: np.ndarray  # H x W x 3 uint8
    base: np.ndarray | None  # H x W uint8
    uss: np.ndarray | None  # D x h x w float32
    wss: list[np.ndarray] | None  # each D_l x h_l x w_l float32
    notes: list[str] = field(default_factory=list)


def find_image(directory: Path, image_id: str) -> Path | None:
    """``<id>.jpg|.jpeg|.png`` in ``directory`` (first found), or None."""
    for suffix in IMAGE_SUFFIXES:
        candidate = directory / f"{image_id}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def load_image_file(path: Path, image_id: str, notes: list[str]) -> np.ndarray:
    """An image file as H x W x 3 uint8; grey, palette, RGBA and 16-bit are converted, noted."""
    name = f"image {path.name}"
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("RGB", "RGBA", "L", "LA"):
                return as_rgb_uint8(np.asarray(img), image_id, str(path), notes, name)
            if mode.startswith("I;16"):
                return as_rgb_uint8(np.asarray(img).astype(np.uint16), image_id, str(path), notes, name)
            if mode == "I":  # 32-bit container: 16-bit data when any value exceeds 8 bits
                grey = np.asarray(img)
                if grey.min(initial=0) >= 0 and grey.max(initial=0) <= 65535:
                    depth = np.uint16 if grey.max(initial=0) > 255 else np.uint8
                    return as_rgb_uint8(grey.astype(depth), image_id, str(path), notes, name)
            notes.append(f"{name}: mode {mode} converted to RGB")
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise InputError(image_id, str(path), f"cannot decode the image: {exc}") from None


def check_grid(image_id: str, source: str, grid: tuple[int, int], size: tuple[int, int]) -> None:
    """Raise unless a map's grid agrees with the image's aspect ratio (:func:`~dhr_label.core.checks.grid_problem`)."""
    problem = grid_problem(tuple(grid), tuple(size))
    if problem is not None:
        raise InputError(image_id, source, problem)


def check_image_source(cams: CamsFile, ids: list[str], images_dir: Path | None) -> None:
    """Raise one :class:`FileLevelError` when none of ``ids`` has an image where refine looks
    (``images_dir``, else the cams file's ``image`` datasets), instead of one failure per image.

    Costs one lookup when the first id has its image; all of them only when it has none.
    """
    if images_dir is not None:
        found = lambda i: find_image(Path(images_dir), i) is not None
        where = f"the --images directory {images_dir} holds no <id>.jpg|.jpeg|.png of them"
    else:
        found = lambda i: cams.has(i, "image")
        where = f"the cams file {cams.path} holds no image dataset for them and no --images DIR was given"
    if not ids or any(found(i) for i in ids):  # stops at the first image found
        return
    raise FileLevelError(f"no image for any of the {len(ids)} selected ids (first: {ids[0]}): {where}; "
                         "the DenseCRF needs the images: give --images DIR")


def load_inputs(
    image_id: str,
    cams: CamsFile,
    feats: FeatsFile | None,
    *,
    uss: bool = False,
    wss: bool = False,
    base_required: bool = False,
    images_dir: Path | None = None,
    base_dir: Path | None = None,
) -> ImageInputs:
    """Gather and validate one image's inputs: the CAMs, tags, image and base mask, and the
    USS (``uss``) and WSS (``wss``) features when asked for.

    A directory given on the command line wins over the dataset in the file (docs/format.md).
    ``base_required``: an image without a base mask is an error (Table 6 row 1 outputs it).

    Raises
    ------
    InputError
        Naming the image, the file or dataset, and expected vs found.
    """
    notes: list[str] = []
    cam, labels = cams.read_cam(image_id, notes)
    silent = labels[cam.reshape(len(labels), -1).max(axis=1) <= 0]
    if len(silent):
        notes.append(f"cam: tag(s) {silent.tolist()} never positive: no seed for them")
    image, image_source = _image(image_id, cams, images_dir, notes)
    base, base_source = _base(image_id, cams, base_dir)
    size = image.shape[:2]
    if base is not None and base.shape != size:
        if images_dir is not None and base_dir is None:
            # The image is the user's override; the base mask is the file's own: blame the image.
            raise InputError(
                image_id, image_source, f"expected the size of the base mask {base_source}, "
                f"{base.shape[0]} x {base.shape[1]} (H x W), found {size[0]} x {size[1]}",
            )
        raise InputError(
            image_id, base_source, f"expected a {size[0]} x {size[1]} mask (the image's size, {image_source}), "
            f"found {base.shape[0]} x {base.shape[1]}",
        )
    if base is not None and cams.ignore_index != 255:
        base = np.where(base == cams.ignore_index, 255, base).astype(np.uint8)
    if base is None:
        if base_required:
            raise InputError(image_id, base_source or str(cams.path), "ablation row 1 outputs the base mask, and none was found")
        notes.append("no base mask: seed only (M_init = M_seed)")
    check_grid(image_id, f"{cams.path}:/{image_id}/cam", cam.shape[1:], size)

    uss_map = wss_maps = None
    if (uss or wss) and feats is None:
        raise InputError(image_id, "--feats", "Steps 2/3 need a feats file")
    if uss:
        uss_map = feats.read_uss(image_id, notes)
        check_grid(image_id, f"{feats.path}:/{image_id}/uss", uss_map.shape[1:], size)
    if wss:
        layers = feats.read_wss(image_id, notes)
        for name, layer in layers:
            where = "wss" if name == "wss" else f"wss/{name}"
            check_grid(image_id, f"{feats.path}:/{image_id}/{where}", layer.shape[1:], size)
        wss_maps = [layer for _, layer in layers]
    return ImageInputs(image_id, cam, labels, image, base, uss_map, wss_maps, notes)


def load_pooling_inputs(
    image_id: str, cams: CamsFile, feats: FeatsFile, *, wss: bool, base_dir: Path | None = None
) -> tuple[np.ndarray | None, np.ndarray | None, list[np.ndarray] | None]:
    """What the class-prototype pass reads of one image: the base mask (None: nothing to pool,
    and the features are not read), the USS features and, with ``wss``, the WSS layers — as
    :func:`load_inputs` gives them, without reading the CAM or the image.

    Raises
    ------
    InputError
    """
    base, _ = _base(image_id, cams, base_dir)
    if base is None:
        return None, None, None
    if cams.ignore_index != 255:
        base = np.where(base == cams.ignore_index, 255, base).astype(np.uint8)
    uss_map = feats.read_uss(image_id)
    check_grid(image_id, f"{feats.path}:/{image_id}/uss", uss_map.shape[1:], base.shape)
    layers = [layer for _, layer in feats.read_wss(image_id)] if wss else None
    for layer in layers or []:
        check_grid(image_id, f"{feats.path}:/{image_id}/wss", layer.shape[1:], base.shape)
    return base, uss_map, layers


def _image(image_id: str, cams: CamsFile, images_dir: Path | None, notes: list[str]) -> tuple[np.ndarray, str]:
    """The image and where it came from: ``--images`` when given, else the file's dataset."""
    if images_dir is not None:
        path = find_image(Path(images_dir), image_id)
        if path is None:
            raise InputError(image_id, str(images_dir), f"no image {image_id}.jpg|.jpeg|.png in this directory")
        return load_image_file(path, image_id, notes), str(path)
    source = f"{cams.path}:/{image_id}/image"
    image = cams.read_image(image_id, notes)
    if image is None:
        raise InputError(image_id, source, "no image in the file and no --images directory given")
    return image, source


def _base(image_id: str, cams: CamsFile, base_dir: Path | None) -> tuple[np.ndarray | None, str]:
    """The base mask and where it came from: ``--base`` when given, else the file's dataset."""
    if base_dir is None:
        return cams.read_base(image_id), f"{cams.path}:/{image_id}/base"
    path = Path(base_dir) / f"{image_id}.png"
    if not path.is_file():
        raise InputError(image_id, str(base_dir), f"no base mask {image_id}.png in this directory")
    try:
        raw = read_mask(path)
    except (OSError, ValueError) as exc:
        raise InputError(image_id, str(path), f"cannot read the base mask: {exc}") from None
    return check_label_map(raw, cams.num_classes, cams.ignore_index, image_id, str(path)), str(path)
