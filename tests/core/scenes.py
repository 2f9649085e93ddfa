"""Tiny generated scenes for the stage tests (no file, no data outside the repository)."""
from __future__ import annotations

import numpy as np

BG = 0
H, W = 24, 32


def fractions(truth: np.ndarray, classes, grid: tuple[int, int]) -> np.ndarray:
    """Share of every class among each grid cell's pixels (cells of whole pixel blocks): C x h x w."""
    height, width = truth.shape
    rows = (np.arange(height) * grid[0]) // height
    cols = (np.arange(width) * grid[1]) // width
    cell = rows[:, None] * grid[1] + cols[None, :]
    per_cell = np.bincount(cell.ravel(), minlength=grid[0] * grid[1])
    out = [np.bincount(cell.ravel(), weights=(truth == c).ravel(), minlength=grid[0] * grid[1]) / per_cell for c in classes]
    return np.stack(out).reshape(len(classes), *grid).astype(np.float32)


def corner_scene(two_tags: bool):
    """Tag 3 covers the top-left 8 x 10 corner (and tag 5 the bottom-right 6 x 8 one); the rest,
    over 80 % of the pixels, is background. The CAM (6 x 8 cells of 4 x 4 pixels) peaks on the
    objects; the image colours them apart from the background."""
    rng = np.random.default_rng(11)
    truth = np.full((H, W), BG, dtype=np.uint8)
    truth[:8, :10] = 3
    labels = [3]
    if two_tags:
        truth[-6:, -8:] = 5
        labels.append(5)
    image = np.full((H, W, 3), 120, dtype=np.uint8)
    image[truth == 3] = (230, 40, 40)
    image[truth == 5] = (40, 40, 230)
    cam = fractions(truth, labels, (6, 8)) + rng.uniform(0, 0.05, (len(labels), 6, 8)).astype(np.float32)
    return truth, np.array(labels), image, cam


def ablation_scene() -> dict:
    """24 x 32 image, tags 3 and 5 on a background; random but seeded CAMs and features."""
    rng = np.random.default_rng(5)
    truth, labels, image, cam = corner_scene(two_tags=True)
    cam = cam + rng.normal(0, 0.2, cam.shape).astype(np.float32)
    base = truth.copy()
    base[base == 5] = BG  # the base mask lost tag 5
    base[10:12, 12:14] = 255  # and holds some ignore pixels
    uss = rng.normal(size=(8, 6, 8)).astype(np.float32)
    wss = [rng.normal(size=(4, 12, 16)).astype(np.float32), rng.normal(size=(6, 3, 4)).astype(np.float32)]
    return dict(cam=cam, labels=labels, image=image, base=base, uss=uss, wss=wss, background=BG)


def two_halves_scene():
    """Class 1 on the left half, 2 on the right; M_init wrongly gives class 1 a 8 x 8 block of the
    right half. USS features (6 x 8 cells of 4 x 4 pixels) are e1 on the left, e2 on the right."""
    rng = np.random.default_rng(2)
    truth = np.full((H, W), 2, dtype=np.uint8)
    truth[:, :16] = 1
    init = truth.copy()
    init[:8, 16:24] = 1
    image = np.where(truth[..., None] == 1, 60, 190).astype(np.uint8).repeat(3, axis=2)
    uss = np.zeros((6, 6, 8), dtype=np.float32)
    uss[0, :, :4] = 1.0
    uss[1, :, 4:] = 1.0
    uss += rng.normal(0, 0.05, uss.shape).astype(np.float32)
    return truth, init, image, uss


def batch_scenes(seed: int = 10) -> list[dict]:
    """Four images of different sizes, tags and grids (so padding is exercised); siblings share a
    prototype, so Step 3 finds groups; one base mask lost a tag, one image has no base mask."""
    rng = np.random.default_rng(seed)
    out = []
    layout = [((64, 80), [0, 2, 5, 9], (16, 20)), ((40, 32), [0, 1, 3], (8, 6)), ((72, 96), [0, 4, 6], (12, 16)),
              ((48, 48), [0, 8], (6, 6))]
    for index, ((height, width), members, grid) in enumerate(layout):
        truth = np.asarray(members, dtype=np.uint8)[rng.integers(0, len(members), (height // 8, width // 8))]
        truth = np.kron(truth, np.ones((8, 8), dtype=np.uint8))
        proto = rng.normal(size=(10, 24)).astype(np.float32)
        proto[5] = proto[2] + 0.05 * rng.normal(size=24)  # 2 and 5 are siblings: one group
        proto[6] = proto[4] + 0.05 * rng.normal(size=24)

        def features(grid_hw, dim):
            shares = fractions(truth, range(10), grid_hw).reshape(10, -1)
            base = np.tile(proto.T @ shares, (max(1, dim // 24), 1))[:dim]
            return (base + 0.1 * rng.normal(size=base.shape)).astype(np.float32).reshape(dim, *grid_hw)

        tags = np.asarray(members[1:])
        cam = fractions(truth, tags, (height // 8, width // 8))
        cam = (cam + 0.2 * rng.normal(size=cam.shape)).astype(np.float32)
        base = truth.copy()
        base[base == tags[-1]] = 0  # lost to the background
        base[:3, :3] = 255
        colours = rng.integers(0, 256, (10, 3))
        image = np.clip(colours[truth] + rng.integers(-8, 9, (height, width, 3)), 0, 255).astype(np.uint8)
        half = (max(1, grid[0] // 2), max(1, grid[1] // 2))
        out.append(dict(cam=cam, labels=tags, image=image, base=None if index == 3 else base,
                        uss=features(grid, 24), wss=[features(half, 48), features(grid, 24)]))
    return out
