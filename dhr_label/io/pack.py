"""Readers of the WSSS ecosystem's own files, and the streaming loop that packs them.

``dhr-label pack`` converts per-image files into the contract (docs/format.md) through
:class:`~dhr_label.io.writer.Writer`, one image at a time. Every reader validates what it
returns and raises :class:`~dhr_label.errors.InputError` naming the image and the input file.

The CAM styles (``<id>.npy`` files holding a pickled dict), and how their keys count classes:

- ``irn`` (IRN ``make_cam.py``): ``{"keys": [K], "cam": [K, h, w] (stride 4), "high_res":
  [K, H, W]}``; the maps are read from ``high_res`` unless another entry is named.
- ``clip-es``: ``{"keys": [K], "attn_highres": [K, H, W] float16}``.
- ``psa`` (PSA / AffinityNet ``infer_cls.py``): ``{key: [H, W] map}``, one entry per tag.

All three key their classes by *foreground index*: k counts the dataset's classes with the
background left out, so it is class id ``k + 1`` when the background is class 0 (VOC, COCO)
and ``k`` itself when the dataset has no background (CamVid, ADE). Files keyed by dataset class
ids use the ``class-id`` convention instead.

A *foreground index* k counts the dataset's classes with the background left out: class id
``k + 1`` when the background is class 0 (VOC, COCO), ``k`` itself when the dataset has no
background (CamVid, ADE). Files keyed by dataset class ids use the ``class-id`` convention.

``.npy`` dicts are pickles. They are unpickled with an allow-list (NumPy arrays, torch
tensors, dicts), so a crafted file cannot run code; ``.pt`` files go through
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import importlib
import io
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InputError
from .checks import BadArray, as_array, check_base, check_cams, check_image, check_map
from .masks import read_mask

KEY_CONVENTIONS = ("foreground", "class-id")


@dataclass(frozen=True)
class CamStyle:
    """Where a pipeline's ``<id>.npy`` keeps its tags and maps, and how its keys count classes."""

    name: str
    keys_entry: str | None  # None: the dict's own keys are the tags (PSA)
    maps_entry: str | None  # default entry of the [K, h, w] maps; None for PSA
    keys: str  # "foreground" or "class-id"


CAM_STYLES: dict[str, CamStyle] = {
    "irn": CamStyle("irn", "keys", "high_res", "foreground"),
    "clip-es": CamStyle("clip-es", "keys", "attn_highres", "foreground"),
    "psa": CamStyle("psa", None, None, "foreground"),
}


def class_ids_of_keys(keys: np.ndarray, convention: str, *, num_classes: int, background: int | None) -> np.ndarray:
    """Dataset class ids of a file's class keys.

    ``foreground``: key k is the k-th class that is not the background (``k + 1`` with the
    background at 0, ``k`` without background). ``class-id``: the key is the class id.

    >>> class_ids_of_keys(np.array([0, 14]), "foreground", num_classes=21, background=0)
    array([ 1, 15])
    """
    keys = np.asarray(keys)
    if keys.ndim != 1 or keys.dtype.kind not in "iuf" or not np.all(keys == np.round(keys)):
        raise BadArray("keys", f"expected a list of integer class keys, found {keys.tolist()!r}")
    keys = keys.astype(np.int64)
    if convention == "class-id":
        return keys
    foreground = np.array([c for c in range(num_classes) if c != background], dtype=np.int64)
    if keys.size and (keys.min() < 0 or keys.max() >= foreground.size):
        raise BadArray(
            "keys",
            f"expected foreground indices in [0, {foreground.size}) (background left out), found {keys.tolist()}",
        )
    return foreground[keys]


# -- safe loading ------------------------------------------------------------------------------
_NUMPY_CORE = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    (f"{_NUMPY_CORE}.multiarray", "_reconstruct"),
    (f"{_NUMPY_CORE}.multiarray", "scalar"),
    (f"{_NUMPY_CORE}.numeric", "_frombuffer"),
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
}


def _storage_from_bytes(data: bytes):
    # Stands in for torch.storage._load_from_bytes, which unpickles without weights_only.
    import torch

    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles arrays, tensors, dicts and lists; refuses every other global."""

    def find_class(self, module: str, name: str):
        if module.startswith(("numpy.core.", "numpy._core.")):  # files written by NumPy 1 or 2
            module = f"{_NUMPY_CORE}.{module.split('.', 2)[2]}"
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _storage_from_bytes
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name}: only arrays, tensors and dicts are read "
                "(a pickle can run code)"
            )
        return getattr(importlib.import_module(module), name)


def load_npy(path: Path):
    """The content of a ``.npy`` file: an array, or the object a pickled 0-d array holds."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f"not a .npy file numpy.save writes (format version {version})")
        shape, _, dtype = readers[version](handle)
        if not dtype.hasobject:
            handle.seek(0)
            return np.lib.format.read_array(handle, allow_pickle=False)
        array = _ArrayUnpickler(handle).load()
    return array.item() if isinstance(array, np.ndarray) and array.shape == () else array


def _load(path: Path, image_id: str, loader):
    try:
        return loader(path)
    except FileNotFoundError:
        raise InputError(image_id, str(path), "file not found") from None
    except Exception as exc:  # noqa: BLE001 - a malformed file may raise anything; report it, go on
        raise InputError(image_id, str(path), f"cannot be read: {type(exc).__name__}: {exc}") from None


def _load_pt(path: Path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


# -- per-source readers ------------------------------------------------------------------------
def read_cams(
    path: Path,
    image_id: str,
    style: CamStyle,
    *,
    num_classes: int,
    background: int | None,
    maps_entry: str | None = None,
    keys: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """CAMs ``[K, h, w]`` and tags ``[K]`` (dataset class ids, ascending) of one style file.

    ``maps_entry`` overrides the style's entry holding the maps (IRN: ``high_res`` or ``cam``);
    ``keys`` overrides its key convention.
    """
    content = _load(path, image_id, load_npy)
    if not isinstance(content, Mapping):
        raise InputError(image_id, str(path), f"expected a pickled dict ({style.name} style), found {_kind(content)}")
    names = {"cam": "the maps", "labels": "the keys"}
    try:
        if style.keys_entry is None:
            raw_keys, maps = _keyed_maps(content)
        else:
            entry = maps_entry or style.maps_entry
            missing = [e for e in (style.keys_entry, entry) if e not in content]
            if missing:
                found = sorted(map(str, content))
                raise InputError(image_id, str(path), f"expected entries {missing} ({style.name} style), found {found}")
            raw_keys, maps = as_array(content[style.keys_entry], "keys"), content[entry]
            names = {"cam": f"entry {entry!r}", "labels": f"entry {style.keys_entry!r}", "keys": f"entry {style.keys_entry!r}"}
        labels = class_ids_of_keys(raw_keys, keys or style.keys, num_classes=num_classes, background=background)
        return check_cams(maps, labels, num_classes=num_classes, background=background)
    except BadArray as exc:
        raise InputError(image_id, str(path), f"{names.get(exc.dataset, exc.dataset)}: {exc.problem}") from None


def _keyed_maps(content: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """PSA's ``{key: [H, W] map}`` as keys ``[K]`` and stacked maps ``[K, H, W]``."""
    keys, maps = [], []
    for key, value in content.items():
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)):
            raise BadArray("keys", f"expected integer class keys, found {key!r}")
        keys.append(int(key))
        maps.append(check_map(value, f"map of key {key}", "hw"))
    if not maps:
        raise BadArray("keys", "expected at least one {key: map} entry, found an empty dict")
    if len({m.shape for m in maps}) > 1:
        raise BadArray("cam", f"expected maps of one size, found {sorted({m.shape for m in maps})}")
    return np.array(keys, dtype=np.int64), np.stack(maps)


def read_features(path: Path, image_id: str, loader: str, notes: list[str] | None = None):
    """A ``[D, h, w]`` feature map (``.pt`` tensor or ``.npy`` array), or for ``.npy`` a
    ``{layer: [D, h, w]}`` dict; returns an array or a dict of arrays.

    A map saved with its batch axis, ``[1, D, h, w]`` (a common ``torch.save(model(x))``), is
    squeezed to ``[D, h, w]`` and the squeeze appended to ``notes``.
    """
    content = _load(path, image_id, _load_pt if loader == "pt" else load_npy)
    shape = getattr(content, "shape", None)
    if shape is not None and len(shape) == 4 and shape[0] == 1:
        content = content[0]
        if notes is not None:
            notes.append(f"{path.name}: [1, D, h, w] {list(shape)} squeezed to [D, h, w]")
    try:
        if isinstance(content, Mapping) and loader == "npy":
            if not content or not all(isinstance(k, str) for k in content):
                raise BadArray("layers", f"expected a dict of named layers, found keys {list(content)[:5]!r}")
            return {name: check_map(value, f"layer {name!r}", "Dhw") for name, value in content.items()}
        if not (isinstance(content, np.ndarray) or hasattr(content, "detach")):
            raise BadArray("features", f"expected a [D, h, w] tensor or array, found {_kind(content)}")
        return check_map(content, "features", "Dhw")
    except BadArray as exc:
        raise InputError(image_id, str(path), f"{exc.dataset}: {exc.problem}") from None


def read_base(path: Path, image_id: str, *, num_classes: int, ignore_index: int) -> np.ndarray:
    """A base mask ``<id>.png`` (palette or grey index) as uint8 class ids ``[H, W]``."""
    mask = _load(path, image_id, read_mask)
    try:
        return check_base(mask, num_classes=num_classes, ignore_index=ignore_index)
    except BadArray as exc:
        raise InputError(image_id, str(path), exc.problem) from None


def read_rgb(path: Path, image_id: str) -> np.ndarray:
    """An image file as RGB uint8 ``[H, W, 3]``."""

    def decode(p: Path) -> np.ndarray:
        with Image.open(p) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)

    return check_image(_load(path, image_id, decode))


def _kind(value) -> str:
    shape = getattr(value, "shape", None)
    return f"{type(value).__name__} of shape {list(shape)}" if shape is not None else type(value).__name__
