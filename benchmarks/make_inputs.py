"""Generate contract-format inputs (docs/format.md v1) at VOC, COCO and COCO-Stuff scale.

Synthetic but structured, so that the CRF and the OT calls do the work they do on real data:
every image is a scene of class blobs (ellipses with wavy borders, a background where the
dataset has one), painted with a colour per class plus shading and noise; the CAMs are the
blurred, noisy class fractions at stride 16 (weaker for small classes); the base mask is the
truth with small classes lost and borders left unlabelled, as a propagation baseline does;
the USS and WSS features are class prototypes mixed by the cells' class fractions, plus
noise, with prototypes of "sibling" classes close enough (cosine ~0.92) for Step 3 to group
them.

Deterministic (image i depends only on ``--seed`` and i) and streamed: one image is built,
written and dropped at a time, so memory does not grow with ``N``.

Usage::

    python benchmarks/make_inputs.py OUT_DIR N [--scale voc|coco|stuff|tiny] [--seed 0]
                                     [--compression none|gzip|lzf]

writes ``OUT_DIR/cams.h5``, ``OUT_DIR/feats.h5`` and ``OUT_DIR/ids.txt``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from dhr_label.core.cap import cell_fractions
from dhr_label.core.resize import resize
from dhr_label.presets import IGNORE_INDEX, PRESETS


@dataclass(frozen=True)
class Scale:
    """Shapes of one generated dataset."""

    preset: str
    sizes: tuple[tuple[int, int], ...]  # image H x W, drawn per image
    tags: tuple[int, int]  # fewest and most image-level tags
    uss_dim: int
    uss_long_side: int  # USS grid cells along the image's longer side
    wss_dims: tuple[int, ...]  # one WSS layer per entry
    stride: int = 16  # CAM and WSS stride


SCALES: dict[str, Scale] = {
    # PASCAL VOC: 21 classes with background, 500 x 375 images, 1-6 tags.
    "voc": Scale("voc", ((375, 500), (500, 375), (333, 500)), (1, 6), 384, 64, (1024, 2048)),
    # COCO: 81 classes with background, 640 x 480 images, up to 20 tags.
    "coco": Scale("coco", ((480, 640), (640, 480), (427, 640)), (1, 20), 384, 64, (1024, 2048)),
    # COCO-Stuff-171: no background, every pixel is a class, up to 30 tags.
    "stuff": Scale("stuff", ((480, 640), (427, 640), (640, 480)), (4, 30), 384, 64, (1024, 2048)),
    # CamVid val's shapes: 11 classes, no background, 360 x 480, ~10 tags, USS 64 x 45 x 60,
    # WSS 112 and 1280 channels at stride 16 (the real benchmark's layout, for throughput runs).
    "camvid": Scale("camvid", ((360, 480),), (6, 11), 64, 60, (112, 1280)),
    # Small images and features, for memory runs over thousands of images and for tests.
    "tiny": Scale("voc", ((96, 128), (128, 96)), (1, 4), 32, 16, (32, 64)),
}


def preset_of(scale: Scale):
    return PRESETS[scale.preset]


def grid_for(size: tuple[int, int], *, stride: int | None = None, long_side: int | None = None) -> tuple[int, int]:
    """A feature grid for an H x W image: ``ceil(side / stride)``, or ``long_side`` cells on
    the longer side and the shorter side in proportion (the aspect ratio within one cell)."""
    height, width = size
    if stride is not None:
        return -(-height // stride), -(-width // stride)
    if height >= width:
        return long_side, max(1, round(long_side * width / height))
    return max(1, round(long_side * height / width)), long_side


class Prototypes:
    """Unit class prototypes of one feature space: siblings (same ``c % groups``) are close."""

    def __init__(self, rng: np.random.Generator, num_classes: int, dim: int, *, groups: int, closeness: float = 0.96):
        shared = _unit(rng.standard_normal((groups, dim)))
        own = _unit(rng.standard_normal((num_classes, dim)))
        group_of = np.arange(num_classes) % groups
        mix = closeness * shared[group_of] + np.sqrt(1.0 - closeness**2) * own
        self.vectors = _unit(mix).astype(np.float32)


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def _box_blur(maps: np.ndarray) -> np.ndarray:
    """3 x 3 mean over the last two axes, edges replicated."""
    padded = np.pad(maps, ((0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = maps.shape[1:]
    return sum(padded[:, i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9.0


def _smooth_field(rng: np.random.Generator, size: tuple[int, int], cells: int = 6) -> np.ndarray:
    """A smooth random field in about [-1, 1] over H x W (bilinear upsampled coarse noise)."""
    coarse = rng.standard_normal((1, cells, cells)).astype(np.float32)
    return resize(torch.from_numpy(coarse), size)[0].numpy()


def class_cell_fractions(truth: np.ndarray, classes: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Soft CAP weights of ``classes`` on ``grid`` (G x h*w float32), as Steps 2-3 compute them."""
    weights, _ = cell_fractions([torch.from_numpy(truth)], [classes], [grid], mode="soft")
    return weights[0].numpy().astype(np.float32)


def pick_tags(rng: np.random.Generator, foreground: np.ndarray, count: int, groups: int) -> np.ndarray:
    """``count`` distinct tags; each after the first is, half the time, a sibling (same
    ``id % groups``) of one already drawn, as a cat comes with a dog more often than chance."""
    tags = [int(rng.choice(foreground))]
    while len(tags) < min(count, len(foreground)):
        siblings = [c for c in foreground if c % groups in {t % groups for t in tags} and c not in tags]
        pool = siblings if siblings and rng.random() < 0.5 else [c for c in foreground if c not in tags]
        tags.append(int(rng.choice(pool)))
    return np.array(sorted(tags))


def scene(rng: np.random.Generator, scale: Scale, colours: np.ndarray, groups: int):
    """The truth label map, the tags and the RGB image of one synthetic image."""
    preset = preset_of(scale)
    background = preset.background
    foreground = np.array([c for c in range(preset.num_classes) if c != background])
    size = scale.sizes[int(rng.integers(len(scale.sizes)))]
    height, width = size
    low, high = scale.tags
    k = low + int((high - low + 1) * rng.random() ** 2)  # most images have few tags
    tags = pick_tags(rng, foreground, k, groups)

    yy = (np.arange(height, dtype=np.float32) / height)[:, None]
    xx = (np.arange(width, dtype=np.float32) / width)[None, :]
    scores = np.empty((len(tags), height, width), dtype=np.float32)
    for i in range(len(tags)):
        area = np.exp(rng.uniform(np.log(0.004), np.log(0.35)))  # from a pole to a bus
        aspect = np.exp(rng.uniform(-0.7, 0.7))
        ry, rx = np.sqrt(area / np.pi * aspect), np.sqrt(area / np.pi / aspect)
        cy, cx = rng.uniform(0.1, 0.9, size=2)
        wave = 0.25 * _smooth_field(rng, size)
        scores[i] = 1.0 - ((yy - cy) / ry) ** 2 - ((xx - cx) / rx) ** 2 + wave + rng.uniform(0, 0.3)
    winner = np.argmax(scores, axis=0)
    truth = tags[winner].astype(np.uint8)
    if background is not None:
        truth[scores.max(axis=0) < 0] = background
    for i, tag in enumerate(tags):  # a tag names a class in the image: give it a few pixels
        if not (truth == tag).any():
            cy, cx = int(rng.integers(height)), int(rng.integers(width))
            truth[max(0, cy - 3) : cy + 3, max(0, cx - 3) : cx + 3] = tag

    shade = 25.0 * _smooth_field(rng, size)[:, :, None]
    noise = rng.normal(0.0, 9.0, size=(height, width, 3)).astype(np.float32)
    image = np.clip(colours[truth] + shade + noise, 0, 255).astype(np.uint8)
    return truth, tags, image


def cams_for(rng: np.random.Generator, truth: np.ndarray, tags: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Raw CAMs ``[K, h, w]``: blurred class fractions, a gain per tag (weak for small
    classes), spill-over and noise, shifted so that raw values go negative as real ones do."""
    fractions = class_cell_fractions(truth, tags, grid)
    maps = _box_blur(fractions.reshape(len(tags), *grid))
    share = fractions.mean(axis=1)
    gain = rng.uniform(0.6, 3.0, size=len(tags)) * np.clip(share / 0.05, 0.25, 1.0)
    spill = 0.3 * maps.mean(axis=0, keepdims=True)
    noise = 0.08 * rng.standard_normal(maps.shape)
    return (gain[:, None, None] * (maps + spill) + noise - 0.05).astype(np.float16)


def base_for(rng: np.random.Generator, truth: np.ndarray, tags: np.ndarray, background: int | None) -> np.ndarray:
    """M_base: the truth with most small classes lost and borders left unlabelled."""
    base = truth.copy()
    for tag in tags:
        region = truth == tag
        if region.mean() < 0.02 and rng.random() < 0.6:
            if background is not None:
                base[region] = background
            else:  # no background: the class under it is the most common other tag nearby
                others = truth[~region]
                base[region] = np.bincount(others, minlength=256).argmax() if others.size else tag
    shift = int(rng.integers(2, 5))
    edge = np.zeros(truth.shape, dtype=bool)
    edge[:-shift] |= truth[:-shift] != truth[shift:]
    edge[:, :-shift] |= truth[:, :-shift] != truth[:, shift:]
    base[edge & (rng.random(truth.shape) < 0.5)] = IGNORE_INDEX
    return base


def features_for(
    rng: np.random.Generator, truth: np.ndarray, prototypes: Prototypes, grid: tuple[int, int], noise: float
) -> np.ndarray:
    """``[D, h, w]`` float16: the cells' class fractions times the prototypes, plus noise."""
    present = np.unique(truth)
    fractions = class_cell_fractions(truth, present, grid)  # G x N
    feats = prototypes.vectors[present].T @ fractions  # D x N
    feats += noise * rng.standard_normal(feats.shape).astype(np.float32)
    return feats.reshape(-1, *grid).astype(np.float16)


def _dataset(group: h5py.Group, name: str, data: np.ndarray, compression: str | None) -> None:
    group.create_dataset(name, data=data, compression=compression if compression != "none" else None)


def generate(out: Path, count: int, *, scale: str = "voc", seed: int = 0, compression: str = "none", progress=None) -> list[str]:
    """Write ``out/cams.h5``, ``out/feats.h5`` and ``out/ids.txt`` for ``count`` images.

    Image ``i`` is drawn from ``np.random.default_rng([seed, i])`` (the dataset-wide colours and
    prototypes from ``[seed]``), so any image can be regenerated alone. Returns the ids.
    """
    spec = SCALES[scale]
    preset = preset_of(spec)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shared = np.random.default_rng([seed])
    colours = shared.uniform(30, 225, size=(256, 3)).astype(np.float32)
    groups = max(2, preset.num_classes // 3)
    uss_space = Prototypes(shared, preset.num_classes, spec.uss_dim, groups=groups)
    wss_spaces = [Prototypes(shared, preset.num_classes, d, groups=groups) for d in spec.wss_dims]
    ids = [f"{scale}_{i:07d}" for i in range(count)]
    background = -1 if preset.background is None else preset.background
    with h5py.File(out / "cams.h5", "w") as cams, h5py.File(out / "feats.h5", "w") as feats:
        cams.attrs.update(
            format="dhr-label/cams", version=1, classes=json.dumps(list(preset.classes)),
            background=background, ignore_index=IGNORE_INDEX,
        )
        feats.attrs.update(format="dhr-label/feats", version=1)
        for i, image_id in enumerate(ids):
            rng = np.random.default_rng([seed, i])
            truth, tags, image = scene(rng, spec, colours, groups)
            size = truth.shape
            group = cams.create_group(image_id)
            _dataset(group, "cam", cams_for(rng, truth, tags, grid_for(size, stride=spec.stride)), compression)
            _dataset(group, "labels", tags.astype(np.int64), compression)
            _dataset(group, "base", base_for(rng, truth, tags, preset.background), compression)
            _dataset(group, "image", image, compression)
            fgroup = feats.create_group(image_id)
            uss_grid = grid_for(size, long_side=spec.uss_long_side)
            _dataset(fgroup, "uss", features_for(rng, truth, uss_space, uss_grid, 0.6), compression)
            layers = fgroup.create_group("wss")
            wss_grid = grid_for(size, stride=spec.stride)
            for index, space in enumerate(wss_spaces):
                _dataset(layers, f"C{index + 4}", features_for(rng, truth, space, wss_grid, 0.8), compression)
            if progress is not None:
                progress(i + 1, count)
    (out / "ids.txt").write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    return ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output directory (cams.h5, feats.h5, ids.txt)")
    parser.add_argument("count", type=int, help="number of images")
    parser.add_argument("--scale", choices=sorted(SCALES), default="voc")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compression", choices=("none", "gzip", "lzf"), default="none")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("count must be >= 1")
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if done == total or done % 50 == 0:
            print(f"\r{done}/{total} images", end="" if done < total else "\n", file=sys.stderr, flush=True)

    generate(args.out, args.count, scale=args.scale, seed=args.seed, compression=args.compression, progress=progress)
    print(
        f"{args.count} {args.scale} images in {args.out} ({time.perf_counter() - start:.1f} s)", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
