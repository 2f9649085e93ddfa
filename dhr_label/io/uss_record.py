"""How a feats file records the making of its USS features (docs/format.md, "USS record").

``dhr-label features`` writes, as root attributes of the feats file, ``uss_settings`` (JSON:
everything that decides the features) and, when it projected them with a PCA, the projection
itself, so a resumed run, a run on another split (``--pca-from``) and a reader can reuse it:
``uss_pca`` (JSON: dimensions, block count, sample size, digest), ``uss_pca_mean``,
``uss_pca_scale``, ``uss_pca_explained`` and the components ``[N, D]`` in row blocks
``uss_pca_components_0``, ``_1``, ... each under HDF5's 64 KiB limit on an attribute in a file
made with the default (widest-compatibility) layout.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np

from ..errors import FileLevelError
from ..features.pca import Projection

SETTINGS_ATTR = "uss_settings"
PCA_ATTR = "uss_pca"
_BLOCK_BYTES = 60_000


def projection_digest(projection: Projection) -> str:
    """SHA-256 prefix of the projection's arrays: names it in the settings."""
    digest = hashlib.sha256()
    for array in (projection.mean, projection.scale, projection.components):
        digest.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
    return digest.hexdigest()[:16]


def read_settings(attrs) -> dict | None:
    """The recorded settings, or None when the file has no USS record."""
    raw = attrs.get(SETTINGS_ATTR)
    if raw is None:
        return None
    return json.loads(raw.decode() if isinstance(raw, bytes) else raw)


def write_record(attrs, settings: dict, projection: Projection | None) -> None:
    """Record ``settings`` (and the projection) in root attributes, replacing an older record."""
    for name in [n for n in attrs if n.startswith(PCA_ATTR)]:
        del attrs[name]
    if projection is not None:
        rows = max(1, _BLOCK_BYTES // (4 * projection.dims[1]))
        blocks = [projection.components[i: i + rows] for i in range(0, projection.dims[0], rows)]
        if projection.dims[1] * 4 > _BLOCK_BYTES:
            raise ValueError(f"a PCA over {projection.dims[1]} channels does not fit the file's attributes")
        for i, block in enumerate(blocks):
            attrs[f"{PCA_ATTR}_components_{i}"] = block.astype(np.float32)
        attrs[f"{PCA_ATTR}_mean"] = projection.mean.astype(np.float32)
        attrs[f"{PCA_ATTR}_scale"] = projection.scale.astype(np.float32)
        attrs[f"{PCA_ATTR}_explained"] = projection.explained.astype(np.float64)
        attrs[PCA_ATTR] = json.dumps({
            "dims": list(projection.dims), "blocks": len(blocks), "cells": projection.cells,
            "images": projection.images, "sha256": projection_digest(projection),
        })
    attrs[SETTINGS_ATTR] = json.dumps(settings, sort_keys=True)


def read_projection(attrs, source: str) -> Projection | None:
    """The recorded projection, or None when the file has none.

    Raises
    ------
    FileLevelError
        The record is damaged (a block missing, shapes that disagree, a digest that differs).
    """
    raw = attrs.get(PCA_ATTR)
    if raw is None:
        return None
    try:
        meta = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        components = np.concatenate([np.asarray(attrs[f"{PCA_ATTR}_components_{i}"]) for i in range(meta["blocks"])])
        projection = Projection(
            mean=np.asarray(attrs[f"{PCA_ATTR}_mean"], np.float32), scale=np.asarray(attrs[f"{PCA_ATTR}_scale"], np.float32),
            components=components.astype(np.float32), explained=np.asarray(attrs[f"{PCA_ATTR}_explained"], np.float64),
            cells=int(meta["cells"]), images=int(meta["images"]),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise FileLevelError(f"{source}: the USS PCA record is damaged ({type(exc).__name__}: {exc})") from None
    if list(projection.dims) != list(meta["dims"]) or projection_digest(projection) != meta["sha256"]:
        raise FileLevelError(
            f"{source}: the USS PCA record is damaged (expected {meta['dims']} with digest {meta['sha256']}, "
            f"found {list(projection.dims)} with digest {projection_digest(projection)})"
        )
    return projection


def projection_from_file(path: Path) -> Projection:
    """The PCA projection recorded in another feats (or combined) file, for ``--pca-from``.

    Raises
    ------
    FileLevelError
        The file is missing, not HDF5, or holds no USS PCA record.
    """
    path = Path(path)
    if not path.is_file():
        raise FileLevelError(f"--pca-from file {path} does not exist")
    try:
        with h5py.File(path, "r") as handle:
            projection = read_projection(handle.attrs, str(path))
    except OSError as exc:
        raise FileLevelError(f"--pca-from file {path} cannot be read as HDF5: {exc}") from None
    if projection is None:
        raise FileLevelError(
            f"--pca-from file {path} holds no USS PCA (expected root attributes {PCA_ATTR}_*, "
            "written by `dhr-label features --pca N`)"
        )
    return projection
