"""``features``' engine: USS feature maps from the images into a feats file, resumable.

The run decides its settings (backbone, weights, layers, scales, flip, window, PCA, ...) before
any work, compares them with the record in the output file, fits or reuses the PCA, then writes
one ``/<id>/uss`` per image through :meth:`~dhr_label.io.writer.Writer.extend` (beside whatever
the group holds), each tagged with the settings' id: a rerun skips the images made with these
settings, and a run with other settings is refused before any work unless ``overwrite``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from ..errors import FileLevelError, InputError
from ..features.backbones import BACKBONES, Network, load_network
from ..features.extract import Inference, multiscale
from ..features.pca import PCAFit, Projection, l2_normalise, project
from ..io.contract import FORMAT_CAMS
from ..io.ids import read_ids
from ..io.uss_record import projection_digest, projection_from_file, read_projection, read_settings, write_record
from ..io.writer import Writer
from .feature_images import ImageSource
from .selection import select_ids
from .signals import exit_code, stop_name, stop_on_signals

#: Attribute of every ``uss`` dataset: the id of the settings that made it.
SETTINGS_ID_ATTR = "dhr_label_settings"
#: Bumped when the maths of a setting changes meaning, so old files are not taken as current.
RECIPE = 1


@dataclass(frozen=True)
class Request:
    """What a ``features`` run was asked for (None: the backbone's default)."""

    out: Path
    cams: Path | None = None
    images: Path | None = None
    backbone: str = "efficientnet-lite0"
    layers: tuple[str, ...] | None = None
    scales: tuple[float, ...] | None = None
    flip: bool | None = None
    window: int = 0
    pca: int | None = None
    pca_sample: int = 64
    pca_from: Path | None = None
    l2: bool = True
    weights: Path | None = None
    head: Path | None = None
    dtype: str = "float16"
    device: str = "cpu"
    batch_size: int = 4
    ids_file: Path | None = None
    limit: int | None = None
    overwrite: bool = False
    strict: bool = False


@dataclass
class Outcome:
    """What the run did: counts, failures, timings, the settings and their id."""

    settings: dict
    settings_id: str
    counts: dict = field(default_factory=lambda: {"selected": 0, "done": 0, "skipped": 0, "failed": 0, "not_run": 0})
    failures: list = field(default_factory=list)
    notes: dict = field(default_factory=dict)
    pca: dict | None = None
    seconds: dict = field(default_factory=dict)
    kept_other: int = 0  # images outside the selection keeping uss made with other settings
    interrupted: str | None = None
    exit_code: int = 0


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FileLevelError("--device cuda: torch sees no CUDA device (install torch's CUDA build, or use --device cpu)")
    return torch.device(name)


def settings_id(settings: dict) -> str:
    """16 hex digits naming ``settings`` (stored on every ``uss`` they made)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two settings dicts."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: {json.dumps(a)} -> {json.dumps(b)}")
    return lines


def _open_writer(request: Request, stack: contextlib.ExitStack) -> Writer:
    """A feats Writer, or a combined one when the output is a cams file (one file for both)."""
    combined = False
    if request.out.is_file():
        try:
            with h5py.File(request.out, "r") as handle:
                found = handle.attrs.get("format")
        except OSError as exc:
            raise FileLevelError(f"--out {request.out} exists but cannot be read as HDF5: {exc}") from None
        combined = (found.decode() if isinstance(found, bytes) else found) == FORMAT_CAMS
    return stack.enter_context(Writer(request.out, kind="combined" if combined else "feats", dtype=request.dtype))


def _refusal(request: Request, others: dict, recorded: dict | None, settings: dict) -> FileLevelError:
    ids = sorted(others)
    known = recorded is not None and any(v == settings_id(recorded) for v in others.values())
    if known:
        what = "; ".join(differences(recorded, settings)) or "the recorded settings"
        why = f"{len(ids)} image(s) (e.g. {ids[0]}) have uss made with other settings: {what}"
    elif any(v is None for v in others.values()):
        why = f"{len(ids)} image(s) (e.g. {ids[0]}) already have uss made elsewhere (no dhr-label settings recorded)"
    else:
        why = f"{len(ids)} image(s) (e.g. {ids[0]}) have uss made with settings no longer recorded in the file"
    return FileLevelError(
        f"{request.out}: {why}. Pass --overwrite to recompute them (the rest of each group is kept), "
        "or write to another --out"
    )


def _network_runner(network, inference: Inference, device: torch.device):
    """``rgb [B, 3, H, W] uint8 numpy-stack -> [B, D, h, w]`` on ``device``, no gradients."""
    module = network.module.to(device)

    @torch.no_grad()
    def run(batch: np.ndarray) -> torch.Tensor:
        images = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float()
        return multiscale(module, images, inference, multiple=network.multiple, stride=network.stride)

    return run


def _finish(raw: torch.Tensor, projection: Projection | None, l2: bool) -> np.ndarray:
    features = project(raw, projection) if projection is not None else raw
    if l2:
        features = l2_normalise(features)
    return features.float().cpu().numpy()


def run_features(request: Request, *, on_phase: Callable[[str, int], None] | None = None,
                 on_image: Callable[[int], None] | None = None) -> Outcome:
    """Run ``features`` as asked; see the module docstring.

    ``on_phase(name, n)`` hears each phase (``pca`` with its sample size, ``images`` with the ids
    to compute) and ``on_image(1)`` each image finished.

    Raises
    ------
    FileLevelError
        A file-level fault: weights, images source, output file, settings that differ.
    """
    phase = on_phase or (lambda name, n: None)
    tick = on_image or (lambda n: None)
    spec = BACKBONES[request.backbone]
    layers = request.layers or spec.layers
    inference = Inference(request.scales or spec.scales, spec.flip if request.flip is None else request.flip, request.window)
    dims = spec.pca if request.pca is None else request.pca
    source_projection = projection_from_file(request.pca_from) if request.pca_from is not None else None
    if source_projection is not None:
        dims = source_projection.dims[0]
    device = _device(request.device)
    t0 = time.perf_counter()
    network = load_network(spec, layers=layers, weights=request.weights, head=request.head)
    if source_projection is not None and source_projection.dims[1] != network.channels:
        raise FileLevelError(
            f"--pca-from {request.pca_from}: its PCA projects {source_projection.dims[1]} channels, "
            f"{request.backbone} with --layers {','.join(layers)} gives {network.channels}"
        )
    if dims and dims > network.channels:
        raise FileLevelError(f"--pca {dims}: {request.backbone} with --layers {','.join(layers)} gives only {network.channels} channels")
    load_seconds = time.perf_counter() - t0
    plan = _Plan(network, layers, inference, dims, source_projection, _network_runner(network, inference, device))
    with contextlib.ExitStack() as stack:
        if request.cams is not None and request.out.is_file() and request.out.resolve() == request.cams.resolve():
            writer = _open_writer(request, stack)  # one file for both sides: read it through the writer
            images = stack.enter_context(ImageSource(request.cams, request.images, handle=writer.h5))
        else:
            images = stack.enter_context(ImageSource(request.cams, request.images))
            writer = _open_writer(request, stack)
        outcome = _run(request, plan, images, writer, phase, tick)
    outcome.seconds["load"] = load_seconds
    return outcome


@dataclass
class _Plan:
    """What the run computes with: the network, its settings, the runner, a given projection."""

    network: Network
    layers: tuple[str, ...]
    inference: Inference
    dims: int
    source_projection: Projection | None
    run: Callable


def _run(request: Request, plan: _Plan, images: ImageSource, writer: Writer, phase, tick) -> Outcome:
    network, layers, inference, dims, source_projection = (
        plan.network, plan.layers, plan.inference, plan.dims, plan.source_projection)
    available = images.ids()
    if not available:
        raise FileLevelError(f"no image to compute: {images.describe()['path']} holds no image group")
    wanted = read_ids(request.ids_file) if request.ids_file is not None else None
    selected, missing = select_ids(available, wanted=wanted, limit=request.limit)
    settings = {
        "recipe": RECIPE, "backbone": request.backbone, "weights": network.weights, "layers": list(layers),
        "scales": list(inference.scales), "flip": inference.flip, "window": inference.window, "l2": request.l2,
        "dtype": request.dtype, "images": images.describe(),
        "pca": None if not dims else {
            "dims": dims, "sample": None if source_projection is not None else min(request.pca_sample, len(available)),
            "from": None if source_projection is None else projection_digest(source_projection),
        },
    }
    outcome = Outcome(settings, settings_id(settings))
    outcome.counts["selected"] = len(selected) + len(missing)
    for image_id in missing:
        outcome.failures.append({"id": image_id, "source": str(request.ids_file), "problem": f"not among the images of {images.describe()['path']}"})
    outcome.counts["failed"] = len(missing)
    run = plan.run
    recorded = read_settings(writer.root_attrs())
    made = writer.uss_tags(SETTINGS_ID_ATTR)
    others = {i: s for i, s in made.items() if s != outcome.settings_id}
    if others and not request.overwrite:
        raise _refusal(request, others, recorded, settings)
    outcome.kept_other = len(set(others) - set(selected))
    projection = source_projection
    if dims and projection is None:
        if recorded == settings:
            projection = read_projection(writer.root_attrs(), str(request.out))
        if projection is None:
            sample = _sample(available, settings["pca"]["sample"])
            phase("pca", len(sample))
            t1 = time.perf_counter()
            projection = _fit(sample, images, run, dims, outcome)
            outcome.seconds["pca"] = time.perf_counter() - t1
    if dims:
        outcome.pca = {"dims": list(projection.dims), "images": projection.images, "cells": projection.cells,
                       "explained": round(float(projection.explained.sum()), 4), "sha256": projection_digest(projection)}
    write_record(writer.root_attrs(), settings, projection)
    done = {i for i, s in made.items() if s == outcome.settings_id}
    todo = [i for i in selected if request.overwrite or i not in done]
    outcome.counts["skipped"] = len(selected) - len(todo)
    phase("images", len(todo))
    t2 = time.perf_counter()
    try:
        with stop_on_signals():
            _compute(todo, images, run, projection, request, writer, outcome, tick)
    except KeyboardInterrupt as interrupt:
        outcome.interrupted = stop_name(interrupt)
        outcome.exit_code = exit_code(interrupt)
    outcome.seconds["images"] = time.perf_counter() - t2
    counts = outcome.counts
    counts["not_run"] = counts["selected"] - counts["done"] - counts["skipped"] - counts["failed"]
    if not outcome.exit_code and outcome.failures:
        outcome.exit_code = 1
    return outcome


def _sample(available: list[str], count: int) -> list[str]:
    """``count`` ids evenly spaced over the sorted ids: the same for every --limit, --ids, rerun."""
    ids = sorted(available)
    if count >= len(ids):
        return ids
    return [ids[int(i * len(ids) / count)] for i in range(count)]


def _fit(sample: list[str], images: ImageSource, run, dims: int, outcome: Outcome) -> Projection:
    """The PCA of the sample's features; an unreadable sample image is left out (the image phase
    reports it), so the fit depends only on the input, not on the selection."""
    fit = PCAFit()
    for image_id in sample:
        try:
            image = images.read(image_id, [])
        except InputError:
            continue
        fit.add(run(image[None])[0].double().cpu().numpy())
    try:
        return fit.fit(dims)
    except ValueError as exc:
        raise FileLevelError(f"--pca {dims}: {exc} (readable sample images: {fit.images} of {len(sample)})") from None


def _batches(todo: list[str], images: ImageSource, size: int, outcome: Outcome, strict: bool):
    """Consecutive images of one size, up to ``size`` at a time; unreadable ones fail alone."""
    batch: list[tuple[str, np.ndarray]] = []
    for image_id in todo:
        notes: list[str] = []
        try:
            image = images.read(image_id, notes)
        except InputError as exc:
            outcome.failures.append({"id": exc.image_id, "source": exc.source, "problem": exc.problem})
            outcome.counts["failed"] += 1
            if strict:
                break
            continue
        if notes:
            outcome.notes[image_id] = notes
        if batch and (batch[0][1].shape != image.shape or len(batch) == size):
            yield batch
            batch = []
        batch.append((image_id, image))
    if batch:
        yield batch


def _compute(todo, images, run, projection, request: Request, writer: Writer, outcome: Outcome, tick) -> None:
    for batch in _batches(todo, images, request.batch_size, outcome, request.strict):
        try:
            raw = run(np.stack([image for _, image in batch]))
            results = [(image_id, raw[k]) for k, (image_id, _) in enumerate(batch)]
        except torch.cuda.OutOfMemoryError:  # (torch.OutOfMemoryError from torch 2.5; this name since 1.13)
            if len(batch) == 1:
                raise FileLevelError(f"{batch[0][0]}: out of device memory for one image (try --window or fewer --scales)") from None
            results = [(image_id, run(image[None])[0]) for image_id, image in batch]  # one at a time
        for image_id, features in results:
            try:
                writer.extend(image_id, uss=_finish(features, projection, request.l2), replace=True,
                              attrs={SETTINGS_ID_ATTR: outcome.settings_id})
            except InputError as exc:
                outcome.failures.append({"id": exc.image_id, "source": exc.source, "problem": exc.problem})
                outcome.counts["failed"] += 1
                if request.strict:
                    return
                continue
            outcome.counts["done"] += 1
            tick(1)
