"""Reading the HDF5 contract of docs/format.md (v1): cams.h5 and feats.h5.

Files are opened read-only and per process (h5py handles must not cross a fork). Nothing is
read until asked for, so listing the ids of a 100,000-image file costs only the group names.
Every reader validates what it returns and raises :class:`~dhr_label.errors.InputError`
naming the image, the file and dataset, and expected vs found.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import h5py
import numpy as np

from ..core.checks import tags_problem
from ..errors import FileLevelError, InputError
from .ids import is_valid_id

FORMAT_CAMS = "dhr-label/cams"
FORMAT_FEATS = "dhr-label/feats"
SUPPORTED_VERSIONS = (1,)
# A group the Writer has started but not finished carries this attribute (see io/writer.py).
INCOMPLETE_ATTR = "dhr_label_incomplete"
_FLOAT_KINDS = ("f",)
#: What an input file with no image group is told (refine and tune stop on it, inspect lists it).
EMPTY = "holds no image (no group at its root): nothing to refine; was it written to the end (dhr-label pack, dhr_label.Writer)?"


def check_id(image_id: str, source: str) -> None:
    """Raise InputError unless ``image_id`` uses only letters, digits, ``_``, ``-``, ``.``."""
    if not is_valid_id(image_id):
        raise InputError(
            image_id, source, "image id may hold only letters, digits, '_', '-' and '.'"
        )


def _open(path: Path, expected_formats: tuple[str, ...], what: str) -> h5py.File:
    path = Path(path)
    if not path.exists():
        raise FileLevelError(f"{what} file {path} does not exist")
    if path.is_dir():
        raise FileLevelError(f"{what} file {path} is a directory, expected an HDF5 file")
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise FileLevelError(f"{what} file {path} {_open_problem(path, exc)}") from None
    found = handle.attrs.get("format")
    if isinstance(found, bytes):
        found = found.decode()
    if found not in expected_formats:
        handle.close()
        raise FileLevelError(
            f"{what} file {path}: root attribute 'format' should be {expected_formats[0]!r}, found {found!r}"
        )
    version = handle.attrs.get("version")
    try:
        version = int(version)
    except (TypeError, ValueError):
        handle.close()
        raise FileLevelError(
            f"{what} file {path}: root attribute 'version' should be an integer, found {version!r}"
        ) from None
    if version not in SUPPORTED_VERSIONS:
        handle.close()
        raise FileLevelError(
            f"{what} file {path}: contract version {version} is not supported "
            f"(this dhr-label reads version {', '.join(map(str, SUPPORTED_VERSIONS))})"
        )
    return handle


def _open_problem(path: Path, exc: OSError) -> str:
    """What HDF5's open error means, in words (its text sits in parentheses)."""
    text = str(exc)
    detail = text[text.find("(") + 1 : text.rfind(")")] if "(" in text else text
    if "file signature not found" in detail:
        size = path.stat().st_size
        return "is empty (0 bytes)" if size == 0 else f"is not an HDF5 file (no HDF5 signature in its {size} bytes)"
    truncated = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", detail)
    if truncated:
        return (
            f"is truncated: {truncated.group(1)} of its {truncated.group(2)} bytes are present "
            "(was its writer interrupted?)"
        )
    if "unable to lock file" in detail:
        return (
            "is locked by another process (is a writer still running on it?); "
            "on a read-only file system, set HDF5_USE_FILE_LOCKING=FALSE"
        )
    message = re.search(r"error message = '([^']*)'", detail)
    if message:
        return f"cannot be read: {message.group(1)}"
    return f"cannot be opened as HDF5: {detail or 'unreadable'}"


def as_rgb_uint8(data: np.ndarray, image_id: str, source: str, notes: list[str] | None, name: str = "image") -> np.ndarray:
    """An image array as H x W x 3 uint8, converting what can be converted without guessing.

    Grey ``[H, W]`` / ``[H, W, 1]`` is copied to the three channels, grey+alpha and RGBA lose
    their alpha, 16-bit values are scaled to 8 bits (x / 257, rounded). Each conversion is
    appended to ``notes``. Anything else (float, 5 channels...) raises InputError.
    """
    data = np.asarray(data)
    done: list[str] = []
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3 or data.shape[2] not in (1, 2, 3, 4) or min(data.shape[:2]) < 1:
        raise InputError(image_id, source, f"expected shape [H, W, 3] (RGB), found {list(data.shape)}")
    if data.dtype == np.uint16:
        data = ((data.astype(np.uint32) + 128) // 257).astype(np.uint8)
        done.append("16-bit values scaled to 8 bits")
    elif data.dtype != np.uint8:
        raise InputError(image_id, source, f"expected uint8 (or uint16) values, found {data.dtype}")
    channels = data.shape[2]
    if channels in (1, 2):
        done.append("grey copied to R, G, B" + (" (alpha dropped)" if channels == 2 else ""))
        data = np.repeat(data[:, :, :1], 3, axis=2)
    elif channels == 4:
        done.append("RGBA: alpha dropped")
        data = data[:, :, :3]
    if done and notes is not None:
        notes.append(f"{name}: " + ", ".join(done))
    # C-contiguous and writable: pydensecrf refuses read-only buffers (e.g. np.asarray of a PIL image).
    return np.require(data, dtype=np.uint8, requirements=["C", "W"])


def one_file(cams, feats) -> bool:
    """Whether ``cams`` and ``feats`` name one file (the two sides of the contract in one file,
    docs/format.md): the same path once resolved (``a/../x.h5`` is ``x.h5`` in every process,
    whatever its working directory), or the same file through a link."""
    if feats is None or cams is None:
        return False
    a, b = Path(cams), Path(feats)
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): it cannot be the other
        return False


class _ContractFile:
    """Common part of the two files: the handle, the id listing, dataset access."""

    what = "HDF5"
    expected_format = ""

    def __init__(self, path: Path, handle: h5py.File):
        self.path = Path(path)
        self._h5 = handle
        self.version = int(handle.attrs["version"])

    @classmethod
    def open(cls, path: Path, *, combined: bool = False):
        """Open ``path`` read-only, checking its ``format`` and ``version`` attributes.

        ``combined``: the file is also used as the other side of the contract (cams and
        feats in one file, docs/format.md), so either ``format`` value is accepted.
        """
        formats = (cls.expected_format,) + ((FORMAT_CAMS, FORMAT_FEATS) if combined else ())
        return cls(path, _open(path, formats, cls.what))

    def close(self) -> None:
        self._h5.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def ids(self) -> list[str]:
        """Image ids (group names), sorted; no dataset is read."""
        return sorted(self._h5.keys())

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._h5

    def has(self, image_id: str, name: str) -> bool:
        """Whether the group of ``image_id`` holds ``name`` (no data read)."""
        group = self._h5.get(image_id)
        return isinstance(group, h5py.Group) and name in group

    def require_images(self) -> list[str]:
        """:meth:`ids`, or a :class:`FileLevelError` when the file holds none: a valid file with
        no image is an unfinished or wrong input, never a dataset to report "done" on."""
        ids = self.ids()
        if not ids:
            raise FileLevelError(f"{self.what} file {self.path} {EMPTY}")
        return ids

    def summary(self) -> dict:
        """Path, size, ``format``, ``version`` and group count of the file (no dataset read)."""
        fmt = self._h5.attrs.get("format")
        return {"path": str(self.path), "bytes": self.path.stat().st_size,
                "format": fmt.decode() if isinstance(fmt, bytes) else fmt, "version": self.version,
                "groups": len(self._h5)}

    def layout(self, image_id: str) -> list[tuple[str, tuple[int, ...], str, str]]:
        """``(name, shape, dtype, compression)`` of every dataset in one image's group, layers of
        a group as ``wss/C4``; no data is read. Empty when the group is absent or not a group."""
        found: list[tuple[str, tuple[int, ...], str, str]] = []

        def visit(node, prefix: str) -> None:
            for name, child in node.items():
                if isinstance(child, h5py.Group):
                    visit(child, f"{prefix}{name}/")
                else:
                    found.append((f"{prefix}{name}", tuple(child.shape), str(child.dtype), child.compression or "none"))

        group = self._h5.get(image_id)
        if isinstance(group, h5py.Group):
            visit(group, "")
        return found

    def _group(self, image_id: str) -> h5py.Group:
        source = str(self.path)
        try:
            group = self._h5.get(image_id)
        except (OSError, RuntimeError, KeyError) as exc:
            raise InputError(image_id, source, f"group /{image_id} cannot be read: {exc}") from None
        if group is None:
            raise InputError(image_id, source, f"no group /{image_id} in this file")
        if not isinstance(group, h5py.Group):
            raise InputError(image_id, source, f"/{image_id} should be a group, found a dataset")
        if INCOMPLETE_ATTR in group.attrs:
            raise InputError(
                image_id, source, f"group /{image_id} is incomplete (its writer was interrupted)"
            )
        return group

    def _source(self, image_id: str, name: str) -> str:
        return f"{self.path}:/{image_id}/{name}"

    def _read(self, image_id: str, node, name: str) -> np.ndarray:
        try:
            return node[()]
        except (OSError, RuntimeError, ValueError) as exc:
            raise InputError(
                image_id, self._source(image_id, name), f"dataset cannot be read (truncated or corrupt): {exc}"
            ) from None

    def _float_map(self, image_id: str, node, name: str, notes: list[str] | None) -> np.ndarray:
        """A [D, h, w] float map as float32, with NaN/Inf cells zeroed (and noted)."""
        source = self._source(image_id, name)
        if not isinstance(node, h5py.Dataset):
            raise InputError(image_id, source, "expected a dataset, found a group")
        if node.ndim != 3:
            raise InputError(image_id, source, f"expected shape [D, h, w], found {list(node.shape)}")
        if node.dtype.kind not in _FLOAT_KINDS:
            raise InputError(image_id, source, f"expected a float dtype, found {node.dtype}")
        if min(node.shape) < 1:
            raise InputError(image_id, source, f"expected non-empty [D, h, w], found {list(node.shape)}")
        data = self._read(image_id, node, name)
        if data.dtype == np.float64 and notes is not None:
            notes.append(f"{name}: float64 read as float32")
        data = np.asarray(data, dtype=np.float32)
        bad = ~np.isfinite(data)
        if bad.any():
            cells = bad.any(axis=0)
            if cells.all():
                raise InputError(image_id, source, "every feature cell holds NaN or Inf")
            data = np.where(cells[None], np.float32(0), data)
            if notes is not None:
                notes.append(f"{name}: {int(cells.sum())} of {cells.size} cells held NaN/Inf and were zeroed")
        norms = np.abs(data).sum(axis=0)
        if not (norms > 0).any():
            raise InputError(image_id, source, "every feature vector is zero: the map carries no information")
        return data


class CamsFile(_ContractFile):
    """A ``dhr-label/cams`` file: CAMs, tags, optional base masks and images."""

    what = "cams"
    expected_format = FORMAT_CAMS

    def __init__(self, path: Path, handle: h5py.File):
        super().__init__(path, handle)
        attrs = handle.attrs
        raw = attrs.get("classes")
        if isinstance(raw, bytes):
            raw = raw.decode()
        try:
            classes = json.loads(raw) if isinstance(raw, str) else None
        except json.JSONDecodeError:
            classes = None
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            handle.close()
            raise FileLevelError(
                f"cams file {path}: root attribute 'classes' should be a JSON list of class names, found {raw!r}"
            )
        if len(classes) > 255:
            handle.close()
            raise FileLevelError(f"cams file {path}: at most 255 classes fit an 8-bit mask, found {len(classes)}")
        self.classes: list[str] = classes
        try:
            background = int(attrs.get("background", -1))
            self.ignore_index = int(attrs.get("ignore_index", 255))
        except (TypeError, ValueError):
            handle.close()
            raise FileLevelError(f"cams file {path}: 'background' and 'ignore_index' must be integers") from None
        if not -1 <= background < len(classes):
            handle.close()
            raise FileLevelError(
                f"cams file {path}: 'background' should be -1 or a class id below {len(classes)}, found {background}"
            )
        if not len(classes) <= self.ignore_index <= 255:
            handle.close()
            raise FileLevelError(
                f"cams file {path}: 'ignore_index' should be in [{len(classes)}, 255], found {self.ignore_index}"
            )
        self.background: int | None = None if background < 0 else background

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def read_cam(self, image_id: str, notes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The CAMs ``[K, h, w]`` (float32, raw) and tags ``[K]`` (int64) of one image.

        float64 CAMs are read as float32 (noted in ``notes``).
        """
        group = self._group(image_id)
        for name in ("cam", "labels"):
            if name not in group:
                raise InputError(image_id, self._source(image_id, name), "required dataset is missing")
        node = group["cam"]
        source = self._source(image_id, "cam")
        _check_layout(node, (3,), "[K, h, w] with K, h, w >= 1", image_id, source, non_empty=True)
        if node.dtype.kind not in _FLOAT_KINDS:
            raise InputError(image_id, source, f"expected float16/float32, found {node.dtype}")
        if node.dtype == np.float64 and notes is not None:
            notes.append("cam: float64 read as float32")
        cam = np.asarray(self._read(image_id, node, "cam"), dtype=np.float32)
        if not np.isfinite(cam).all():
            raise InputError(
                image_id, source, f"expected finite values, found {int((~np.isfinite(cam)).sum())} NaN/Inf"
            )
        labels = self._labels(image_id, group["labels"], cam.shape[0])
        return cam, labels

    def _labels(self, image_id: str, node, k: int) -> np.ndarray:
        source = self._source(image_id, "labels")
        _check_layout(node, (1,), "[K]", image_id, source)
        if node.dtype.kind not in "iu":
            raise InputError(image_id, source, f"expected an integer dtype, found {node.dtype}")
        labels = np.asarray(self._read(image_id, node, "labels"), dtype=np.int64)
        problem = tags_problem(labels.tolist(), channels=k, num_classes=self.num_classes, background=self.background)
        if problem is not None:
            raise InputError(image_id, source, problem)
        return labels

    def read_base(self, image_id: str) -> np.ndarray | None:
        """The base mask ``[H, W]`` uint8 of one image, or None when the file has none."""
        group = self._group(image_id)
        if "base" not in group:
            return None
        node = group["base"]
        source = self._source(image_id, "base")
        _check_layout(node, (2,), "[H, W]", image_id, source)
        if node.dtype.kind not in "iu":
            raise InputError(image_id, source, f"expected uint8 class ids, found {node.dtype}")
        base = self._read(image_id, node, "base")
        return check_label_map(base, self.num_classes, self.ignore_index, image_id, source)

    def read_image(self, image_id: str, notes: list[str] | None = None) -> np.ndarray | None:
        """The RGB image ``[H, W, 3]`` uint8 of one image, or None when the file has none.

        Grey, grey+alpha, RGBA and 16-bit images are converted (see :func:`as_rgb_uint8`) and
        the conversion noted in ``notes``.
        """
        group = self._group(image_id)
        if "image" not in group:
            return None
        node = group["image"]
        source = self._source(image_id, "image")
        _check_layout(node, (2, 3), "[H, W, 3] (RGB)", image_id, source)
        if node.dtype not in (np.uint8, np.uint16):
            raise InputError(image_id, source, f"expected uint8 (or uint16) values, found {node.dtype}")
        return as_rgb_uint8(self._read(image_id, node, "image"), image_id, source, notes)


class FeatsFile(_ContractFile):
    """A ``dhr-label/feats`` file: USS and WSS feature maps."""

    what = "feats"
    expected_format = FORMAT_FEATS

    def read_uss(self, image_id: str, notes: list[str] | None = None) -> np.ndarray:
        """USS features ``[D, h, w]`` float32 of one image."""
        group = self._group(image_id)
        if "uss" not in group:
            raise InputError(image_id, self._source(image_id, "uss"), "required dataset is missing")
        return self._float_map(image_id, group["uss"], "uss", notes)

    def read_wss(self, image_id: str, notes: list[str] | None = None) -> list[tuple[str, np.ndarray]]:
        """WSS feature layers, each ``(name, [D, h, w] float32)``, sorted by layer name."""
        group = self._group(image_id)
        if "wss" not in group:
            raise InputError(image_id, self._source(image_id, "wss"), "required dataset is missing")
        node = group["wss"]
        if isinstance(node, h5py.Dataset):
            return [("wss", self._float_map(image_id, node, "wss", notes))]
        names = sorted(node.keys())
        if not names:
            raise InputError(image_id, self._source(image_id, "wss"), "expected one or more layers, found an empty group")
        return [(n, self._float_map(image_id, node[n], f"wss/{n}", notes)) for n in names]


def _check_layout(node, ndims: tuple[int, ...], expected: str, image_id: str, source: str, *, non_empty: bool = False) -> None:
    """Raise unless ``node`` is a dataset with one of ``ndims`` dimensions (and no empty axis)."""
    if isinstance(node, h5py.Dataset) and node.ndim in ndims and not (non_empty and min(node.shape) < 1):
        return
    found = list(node.shape) if isinstance(node, h5py.Dataset) else "a group"
    raise InputError(image_id, source, f"expected shape {expected}, found {found}")


def check_label_map(labels: np.ndarray, num_classes: int, ignore_index: int, image_id: str, source: str) -> np.ndarray:
    """Validate a class-id map: values in ``[0, num_classes)`` or ``ignore_index``; uint8 out."""
    labels = np.asarray(labels)
    valid = (labels < num_classes) | (labels == ignore_index)
    if labels.dtype.kind == "i":
        valid &= labels >= 0
    if not valid.all():
        bad = np.unique(labels[~valid])[:5].tolist()
        raise InputError(
            image_id, source, f"expected class ids in [0, {num_classes}) or {ignore_index}, found {bad}"
        )
    return np.ascontiguousarray(labels, dtype=np.uint8)
