"""Checks of the arrays a :class:`~dhr_label.io.writer.Writer` stores (and ``pack`` reads), and
the chunking and dtype of what is stored: each check names the dataset, expected vs found."""
from __future__ import annotations

import math

import numpy as np

from ..errors import InputError
from .contract import check_label_map

#: Target size of one HDF5 chunk; a reader loads whole maps, so one chunk per map is ideal
#: and larger maps are split along their leading axes.
CHUNK_BYTES = 1 << 20


def chunk_shape(shape: tuple[int, ...], itemsize: int, *, target: int = CHUNK_BYTES) -> tuple[int, ...]:
    """Chunk shape for a dataset of ``shape``: the whole array if it fits ``target`` bytes.

    Otherwise the leading axes are cut first (channels, then rows), so that a chunk is a run
    of whole channels or whole rows of at most ``target`` bytes (at least one element).

    >>> chunk_shape((3, 375, 500), 2)
    (2, 375, 500)
    """
    chunk = list(shape)
    for axis in range(len(chunk)):
        inner = itemsize * math.prod(chunk[axis + 1 :])
        if inner * chunk[axis] <= target:
            break
        chunk[axis] = max(1, target // inner)
    return tuple(chunk)


class BadArray(ValueError):
    """An array that breaks the contract: ``dataset`` names it, ``problem`` says expected vs found."""

    def __init__(self, dataset: str, problem: str):
        self.dataset = dataset
        self.problem = problem
        super().__init__(f"{dataset}: {problem}")


def as_array(value, name: str) -> np.ndarray:
    """``value`` as a NumPy array; torch tensors (any device, bfloat16 too) are copied to the CPU.

    Raises :class:`BadArray` for anything that is not integer or float array data.
    """
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    array = np.asarray(value)
    if array.dtype.kind not in "iuf":
        raise BadArray(name, f"expected an integer or float array, found dtype {array.dtype}")
    return array


def check_map(value, name: str, dims: str) -> np.ndarray:
    """A finite real map with one axis per letter of ``dims`` (e.g. ``"Khw"``), each >= 1."""
    array = as_array(value, name)
    if array.ndim != len(dims) or min(array.shape, default=0) < 1:
        raise BadArray(name, f"expected shape [{', '.join(dims)}] with every size >= 1, found {list(array.shape)}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise BadArray(name, f"expected finite values, found {int((~np.isfinite(array)).sum())} NaN/Inf")
    return array


def check_labels(value, *, num_classes: int, background: int | None) -> np.ndarray:
    """Image-level tags as int64 ``[K]``: unique foreground class ids (any order)."""
    labels = as_array(value, "labels")
    if labels.ndim != 1 or labels.size < 1:
        raise BadArray("labels", f"expected shape [K] with K >= 1 tags, found {list(labels.shape)}")
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise BadArray("labels", f"expected integer class ids, found {labels.tolist()}")
    labels = labels.astype(np.int64)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise BadArray("labels", f"expected class ids in [0, {num_classes}), found {labels.tolist()}")
    if len(np.unique(labels)) != labels.size:
        raise BadArray("labels", f"expected unique class ids, found {labels.tolist()}")
    if background is not None and background in labels:
        raise BadArray("labels", f"must not include the background id {background}, found {labels.tolist()}")
    return labels


def check_cams(cam, labels, *, num_classes: int, background: int | None) -> tuple[np.ndarray, np.ndarray]:
    """CAMs ``[K, h, w]`` and their tags ``[K]``, both reordered so that the tags ascend."""
    tags = check_labels(labels, num_classes=num_classes, background=background)
    maps = check_map(cam, "cam", "Khw")
    if maps.shape[0] != tags.size:
        raise BadArray("cam", f"expected {tags.size} channels (one per tag), found {maps.shape[0]}")
    order = np.argsort(tags, kind="stable")
    return maps[order], tags[order]


def check_base(value, *, num_classes: int, ignore_index: int) -> np.ndarray:
    """A base mask ``[H, W]`` of class ids or ``ignore_index``, as uint8."""
    mask = as_array(value, "base")
    if mask.ndim != 2 or min(mask.shape, default=0) < 1 or mask.dtype.kind not in "iu":
        raise BadArray("base", f"expected [H, W] integer class ids, found {mask.dtype} {list(mask.shape)}")
    try:
        return check_label_map(mask, num_classes, ignore_index, "", "")
    except InputError as exc:
        raise BadArray("base", exc.problem) from None


def check_image(value) -> np.ndarray:
    """An RGB image ``[H, W, 3]`` as uint8 (integer input must lie in [0, 255])."""
    image = as_array(value, "image")
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape) < 1:
        raise BadArray("image", f"expected shape [H, W, 3], found {list(image.shape)}")
    if image.dtype.kind == "f":
        raise BadArray("image", f"expected uint8 RGB values, found {image.dtype}")
    if image.dtype != np.uint8 and (image.min() < 0 or image.max() > 255):
        raise BadArray("image", f"expected values in [0, 255], found [{image.min()}, {image.max()}]")
    return np.ascontiguousarray(image, dtype=np.uint8)


def to_storage(values: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
    """``values`` cast to the stored float ``dtype``, refusing values that overflow it."""
    with np.errstate(over="ignore"):  # overflow is detected below and reported
        stored = np.ascontiguousarray(values, dtype=dtype)
    if not np.isfinite(stored).all():
        peak = float(np.abs(values).max())
        raise BadArray(
            name,
            f"values up to {peak:.6g} overflow {dtype} (largest {float(np.finfo(dtype).max):.6g}); "
            "keep float32 instead (dtype='float32', or --dtype float32)",
        )
    return stored
