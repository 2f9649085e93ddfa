"""Writing the HDF5 contract of docs/format.md (v1): cams.h5 and feats.h5, one image at a time.

:class:`Writer` is the public way to produce the files from a user's own extractor, and the
back end of ``dhr-label pack``. It validates every array against the contract before it
touches the file, stores maps chunked and gzip-compressed (float16 unless asked to keep
float32), and is resumable: reopening a file appends, and an image already complete is
skipped.

A killed process never leaves a half-written group that looks complete: a group is created
carrying the attribute :data:`~dhr_label.io.contract.INCOMPLETE_ATTR`, its datasets are
written and flushed, and only then is the attribute removed (and the file flushed again).
Readers treat a group with the attribute as absent; the next ``add`` of that id rewrites it.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np

from ..errors import DHRLabelError, FileLevelError, InputError
from ..presets import IGNORE_INDEX, Preset, resolve_preset
from .checks import BadArray, check_base, check_cams, check_image, check_map, chunk_shape, to_storage
from .contract import FORMAT_CAMS, FORMAT_FEATS, INCOMPLETE_ATTR, check_id
from .ids import is_valid_id

VERSION = 1
KINDS = ("cams", "feats", "combined")
DTYPES = ("float16", "float32")
GZIP_LEVEL = 4

_FROM_CLASSES = object()  # ``background`` not given: take it from the class list


class Writer:
    """Write images into a ``dhr-label/cams`` or ``dhr-label/feats`` HDF5 file (docs/format.md).

    Parameters
    ----------
    path : str or Path
        The HDF5 file. Its directory must exist.
    classes : str, Path, Preset or sequence of str, optional
        The dataset's classes (cams files only): a preset name (``"voc"``), a class-list file,
        a :class:`~dhr_label.presets.Preset`, or the names in id order. May be left out when
        appending to an existing cams file (the file's classes are used).
    background : int or None, optional
        Id of the background class, None when the dataset has none. By default the preset's,
        or for a list of names the position of ``"background"`` in it, if any.
    ignore_index : int
        The mask label meaning "ignore" (``255``).
    kind : {"cams", "feats", "combined"}
        Which of the two files this is; ``"combined"`` is one file holding both sides
        (docs/format.md allows it): its ``format`` is the cams one and each image has ``cam`` and
        ``labels`` plus, optionally, ``uss`` / ``wss``.
    dtype : {"float16", "float32"}
        How CAMs and features are stored. float16 halves the file; values beyond +-65504
        are refused (keep float32 for those).
    mode : {"a", "w"}
        ``"a"`` (default) creates the file or appends to it (it must then agree on format,
        classes, background and ignore index); ``"w"`` starts a new, empty file.

    Examples
    --------
    >>> import numpy as np, dhr_label
    >>> with dhr_label.Writer("cams.h5", classes="voc") as w:  # doctest: +SKIP
    ...     w.add("2007_000032", cam=np.zeros((2, 24, 32), np.float32), labels=[1, 15])
    True

    Notes
    -----
    ``add`` returns False, writing nothing, for an id that is already complete in the file:
    a crashed extraction restarts where it stopped. Test ``image_id in writer`` first to skip
    computing it at all.
    """

    def __init__(
        self,
        path,
        *,
        classes=None,
        background=_FROM_CLASSES,
        ignore_index: int = IGNORE_INDEX,
        kind: str = "cams",
        dtype: str = "float16",
        mode: str = "a",
    ):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if str(dtype) not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if mode not in ("a", "w"):
            raise ValueError(f"mode must be 'a' (append/resume) or 'w' (new file), got {mode!r}")
        if kind == "feats" and (classes is not None or background is not _FROM_CLASSES):
            raise ValueError("classes and background belong to a cams file, not to kind='feats'")
        self.path = Path(path)
        self.kind = kind
        self.dtype = np.dtype(str(dtype))
        self.classes: list[str] = []
        self.background: int | None = None
        self.ignore_index = int(ignore_index)
        if classes is not None:
            self.classes, self.background = _class_list(classes, background)
            if not len(self.classes) <= self.ignore_index <= 255:
                raise ValueError(
                    f"ignore_index must lie in [{len(self.classes)}, 255] (not a class id), got {ignore_index}"
                )
        self._file: h5py.File | None = None
        self._file = self._open(mode, classes is not None)

    # -- opening ------------------------------------------------------------------------------
    @property
    def _format(self) -> str:
        return FORMAT_FEATS if self.kind == "feats" else FORMAT_CAMS

    def _open(self, mode: str, have_classes: bool) -> h5py.File:
        if mode == "a" and self.path.exists():
            try:
                handle = h5py.File(self.path, "r+")
            except OSError as exc:
                raise FileLevelError(
                    f"{self.path}: cannot open to append (expected a writable HDF5 file): {exc}"
                ) from None
            try:
                self._check_existing(handle, have_classes)
            except BaseException:
                handle.close()
                raise
            return handle
        if self.kind != "feats" and not have_classes:
            raise ValueError(f"classes= is required to create the cams file {self.path}")
        if not self.path.parent.is_dir():
            raise FileLevelError(f"{self.path}: the directory {self.path.parent} does not exist")
        try:
            handle = h5py.File(self.path, "w")
        except OSError as exc:
            raise FileLevelError(f"{self.path}: cannot create the file: {exc}") from None
        handle.attrs["format"] = self._format
        handle.attrs["version"] = np.int64(VERSION)
        if self.kind != "feats":
            handle.attrs["classes"] = json.dumps(self.classes)
            handle.attrs["background"] = np.int64(-1 if self.background is None else self.background)
            handle.attrs["ignore_index"] = np.int64(self.ignore_index)
        handle.flush()
        return handle

    def _check_existing(self, handle: h5py.File, have_classes: bool) -> None:
        attrs = handle.attrs
        found = _text(attrs.get("format"))
        if found != self._format:
            raise FileLevelError(
                f"{self.path}: cannot append: root attribute 'format' is {found!r}, expected {self._format!r}"
            )
        if _int(attrs.get("version")) != VERSION:
            raise FileLevelError(
                f"{self.path}: cannot append: contract version {attrs.get('version')!r}, this writer writes {VERSION}"
            )
        if self.kind == "feats":
            return
        try:
            classes = json.loads(_text(attrs.get("classes")) or "null")
        except json.JSONDecodeError:
            classes = None
        background = _int(attrs.get("background"))
        ignore_index = _int(attrs.get("ignore_index"))
        if not isinstance(classes, list) or background is None or ignore_index is None:
            raise FileLevelError(
                f"{self.path}: cannot append: expected root attributes 'classes' (JSON list), "
                "'background' and 'ignore_index' (integers)"
            )
        background = None if background < 0 else background
        if not have_classes:
            self.classes, self.background, self.ignore_index = classes, background, ignore_index
            return
        for name, mine, theirs in (
            ("classes", self.classes, classes),
            ("background", self.background, background),
            ("ignore_index", self.ignore_index, ignore_index),
        ):
            if mine != theirs:
                raise FileLevelError(
                    f"{self.path}: cannot append: the file's {name} is {_short(theirs)}, "
                    f"this writer's is {_short(mine)} (write to a new file, or delete this one)"
                )

    # -- the API ------------------------------------------------------------------------------
    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Flush and close the file (closing twice is harmless)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __repr__(self) -> str:
        state = "open" if self._file is not None else "closed"
        return f"Writer({str(self.path)!r}, kind={self.kind!r}, dtype={self.dtype.name!r}, {state})"

    def __contains__(self, image_id: str) -> bool:
        """Whether ``image_id`` is complete in the file (an interrupted group is not)."""
        if not is_valid_id(image_id):
            return False
        group = self._handle().get(image_id)
        return isinstance(group, h5py.Group) and INCOMPLETE_ATTR not in group.attrs

    def add(self, image_id: str, *, cam=None, labels=None, base=None, image=None, uss=None, wss=None) -> bool:
        """Write one image; return False (writing nothing) when it is already complete.

        Arrays may be NumPy arrays or torch tensors (copied to the CPU).

        Parameters
        ----------
        image_id : str
            Letters, digits, ``_``, ``-``, ``.`` (docs/format.md "Image ids").
        cam : array [K, h, w], float (cams)
            Raw class activation maps, one channel per tag, any resolution.
        labels : array [K], int (cams)
            The tags: foreground class ids, unique; channels are stored sorted by tag.
        base : array [H, W], int, optional (cams)
            Base pseudo-mask: class ids or ``ignore_index``.
        image : array [H, W, 3], uint8, optional (cams)
            The RGB image; same H x W as ``base`` when both are given.
        uss : array [D, h, w], float, optional (feats)
            Unsupervised features.
        wss : array [D, h, w] or mapping of layer name -> array [D, h, w], optional (feats)
            Features of the weakly-supervised network, one map or one per layer.

        Raises
        ------
        InputError
            An array breaks the contract (names the image, the dataset, expected vs found).
        FileLevelError
            The file cannot be written (disk full, closed file).
        """
        handle = self._handle()
        given_feats = uss is not None or wss is not None
        given_cams = any(v is not None for v in (cam, labels, base, image))
        if self.kind != "feats" and (cam is None or labels is None or (given_feats and self.kind == "cams")):
            raise TypeError(f"a {self.kind} Writer takes cam= and labels= (optionally base=, image=)"
                            + (", uss=, wss=" if self.kind == "combined" else ""))
        if self.kind == "feats" and (given_cams or not given_feats):
            raise TypeError("a feats Writer takes uss= and/or wss=")
        if not isinstance(image_id, str):
            raise TypeError(f"image_id must be a str, got {type(image_id).__name__}")
        check_id(image_id, str(self.path))
        if image_id in self:
            return False
        try:
            datasets = self._cams(cam, labels, base, image) if self.kind != "feats" else {}
            datasets.update(self._feats(uss, wss))
        except BadArray as exc:
            raise InputError(image_id, f"{self.path}:/{image_id}/{exc.dataset}", exc.problem) from None
        try:
            self._write(handle, image_id, datasets)
        except OSError as exc:
            raise FileLevelError(f"{self.path}: cannot write image {image_id}: {exc}") from None
        return True

    def extend(self, image_id: str, *, uss, replace: bool = False, attrs: Mapping | None = None) -> bool:
        """Add ``uss`` to an image's group beside what it holds (its WSS layers, its CAMs).

        The group is created when absent (a feats file; a combined file needs the image's CAMs
        first), with the same marker as :meth:`add`. An existing group is
        marked with :data:`~dhr_label.io.contract.INCOMPLETE_ATTR` naming the dataset being added
        until it is flushed, so a killed writer leaves the image incomplete, never half-written;
        the next ``extend`` of that id completes it and keeps the rest of the group.

        ``attrs`` are set on the ``uss`` dataset (e.g. which settings made it) before the group is
        declared complete.

        Returns
        -------
        bool
            False (writing nothing) when the group already has a complete ``uss`` and not
            ``replace``.

        Raises
        ------
        InputError
            ``uss`` breaks the contract, or a combined file has no group for the image (its CAMs
            must be written first).
        FileLevelError
            The file cannot be written.
        """
        if self.kind == "cams":
            raise TypeError("extend adds features: open the Writer with kind='feats' or 'combined'")
        check_id(image_id, str(self.path))
        handle = self._handle()
        group = handle.get(image_id)
        resumable = isinstance(group, h5py.Group) and _text(group.attrs.get(INCOMPLETE_ATTR)) == "extend:uss"
        fresh = not resumable and image_id not in self  # absent, or left incomplete by add
        if fresh and self.kind == "combined":
            raise InputError(image_id, f"{self.path}:/{image_id}", "no complete group to add uss to (write its cam first)")
        if not fresh and not resumable and "uss" in group and not replace:
            return False
        try:
            datasets = self._feats(uss, None)
        except BadArray as exc:
            raise InputError(image_id, f"{self.path}:/{image_id}/{exc.dataset}", exc.problem) from None
        try:
            if fresh:
                if image_id in handle:
                    del handle[image_id]
                group = handle.create_group(image_id)
            group.attrs[INCOMPLETE_ATTR] = "extend:uss"
            handle.flush()
            if "uss" in group:
                del group["uss"]
            _create(group, "uss", datasets["uss"])
            for name, value in (attrs or {}).items():
                group["uss"].attrs[name] = value
            handle.flush()  # the data reach the file before the group is declared complete
            del group.attrs[INCOMPLETE_ATTR]
            handle.flush()
        except OSError as exc:
            raise FileLevelError(f"{self.path}: cannot write image {image_id}: {exc}") from None
        return True

    def uss_tags(self, attr: str) -> dict[str, str | None]:
        """``{id: value of the attribute attr on its uss}`` for every complete group holding a uss
        (None where the attribute is absent): which settings made the features already there."""
        found = {}
        for image_id, group in self._handle().items():
            if isinstance(group, h5py.Group) and INCOMPLETE_ATTR not in group.attrs and "uss" in group:
                value = group["uss"].attrs.get(attr)
                found[image_id] = value.decode() if isinstance(value, bytes) else value
        return found

    @property
    def h5(self) -> h5py.File:
        """The open file (read it through this handle: HDF5 refuses a second open of a file being written)."""
        return self._handle()

    def root_attrs(self) -> h5py.AttributeManager:
        """The file's root attributes (for records such as how its features were made)."""
        return self._handle().attrs

    # -- internals ----------------------------------------------------------------------------
    def _handle(self) -> h5py.File:
        if self._file is None:
            raise FileLevelError(f"{self.path}: the Writer is closed")
        return self._file

    def _cams(self, cam, labels, base, image) -> dict:
        maps, tags = check_cams(cam, labels, num_classes=len(self.classes), background=self.background)
        datasets = {"cam": to_storage(maps, self.dtype, "cam"), "labels": tags}
        if base is not None:
            datasets["base"] = check_base(base, num_classes=len(self.classes), ignore_index=self.ignore_index)
        if image is not None:
            datasets["image"] = check_image(image)
        if "base" in datasets and "image" in datasets and datasets["base"].shape != datasets["image"].shape[:2]:
            raise BadArray(
                "base",
                f"expected the image's H x W {list(datasets['image'].shape[:2])}, found {list(datasets['base'].shape)}",
            )
        return datasets

    def _feats(self, uss, wss) -> dict:
        datasets: dict = {}
        if uss is not None:
            datasets["uss"] = to_storage(check_map(uss, "uss", "Dhw"), self.dtype, "uss")
        if isinstance(wss, Mapping):
            if not wss:
                raise BadArray("wss", "expected one or more layers, found an empty mapping")
            layers = {}
            for layer, value in wss.items():
                if not isinstance(layer, str) or not layer or "/" in layer or layer in (".", ".."):
                    raise BadArray("wss", f"layer names must be non-empty strings without '/', found {layer!r}")
                name = f"wss/{layer}"
                layers[layer] = to_storage(check_map(value, name, "Dhw"), self.dtype, name)
            datasets["wss"] = layers
        elif wss is not None:
            datasets["wss"] = to_storage(check_map(wss, "wss", "Dhw"), self.dtype, "wss")
        return datasets

    def _write(self, handle: h5py.File, image_id: str, datasets: dict) -> None:
        if image_id in handle:  # an interrupted earlier attempt
            del handle[image_id]
        group = handle.create_group(image_id)
        group.attrs[INCOMPLETE_ATTR] = np.int8(1)
        for name, value in datasets.items():
            if isinstance(value, dict):
                layers = group.create_group(name)
                for layer, array in value.items():
                    _create(layers, layer, array)
            else:
                _create(group, name, value)
        handle.flush()  # the data reach the file before the group is declared complete
        del group.attrs[INCOMPLETE_ATTR]
        handle.flush()


def _create(parent: h5py.Group, name: str, array: np.ndarray) -> None:
    parent.create_dataset(
        name,
        data=array,
        chunks=chunk_shape(array.shape, array.dtype.itemsize),
        compression="gzip",
        compression_opts=GZIP_LEVEL,
        shuffle=array.dtype.itemsize > 1,
    )


def _class_list(classes, background) -> tuple[list[str], int | None]:
    """Names and background id from a preset name/path, a Preset or a list of names."""
    if isinstance(classes, (str, Path)):
        classes = resolve_preset(classes)
    if isinstance(classes, Preset):
        names, default = list(classes.classes), classes.background
    elif isinstance(classes, Sequence) and all(isinstance(c, str) for c in classes):
        names = list(classes)
        lowered = [c.lower() for c in names]
        default = lowered.index("background") if "background" in lowered else None
    else:
        raise TypeError("classes must be a preset name, a class-list file, a Preset or a list of names")
    if not names or len(names) > 255 or len(set(names)) != len(names):
        raise DHRLabelError(f"classes: expected 1 to 255 unique names, found {len(names)} ({len(set(names))} unique)")
    chosen = default if background is _FROM_CLASSES else background
    if chosen is not None and not (isinstance(chosen, (int, np.integer)) and 0 <= chosen < len(names)):
        raise ValueError(f"background must be None or a class id in [0, {len(names)}), got {chosen!r}")
    return names, None if chosen is None else int(chosen)


def _text(value) -> str | None:
    return value.decode() if isinstance(value, bytes) else value if isinstance(value, str) else None


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
