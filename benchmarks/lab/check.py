"""Check the lab against the package: the cached Step 1 and the lab's stages give refine's masks.

    nice -n 10 .venv/bin/python benchmarks/lab/check.py camvid --masks DIR [-j 2]

``DIR``: the masks of ``dhr-label refine`` with the package defaults on the same set
(``dhr-label refine --cams .../cams.h5 --feats .../feats.h5 --out DIR -j 2``, with ``--classes``
for a set that needs it). Per image: the lab's HEAT_MAPS stage without hooks
(``heat.rebalance_heat``) must give the package's heat maps exactly, and the ``main`` variant's
mask (the cached Step 1 resumed, the package's stages, its DenseCRF) must equal refine's PNG
byte for byte. The prototypes the lab pools must equal the file refine saved beside its masks.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import heat as lab_heat
import numpy as np
import torch
import variants

from dhr_label.core.pipeline import Stage, resume
from dhr_label.core.prototypes import Prototypes
from dhr_label.core.rebalance import rebalance_heat
from dhr_label.io.masks import read_mask
from dhr_label.params import DHRParams
from dhr_label.presets import Preset
from dhr_label.runtime.parallel import map_chunks
from dhr_label.runtime.prototypes import FILE_NAME, load


@dataclass(frozen=True)
class Job:
    ds: common.DataSet
    masks: Path
    preset: Preset
    prototypes: Prototypes


def check(job: Job, image_ids: list[str]) -> list[tuple[str, float, int]]:
    """Per image: max |lab heat - package heat| (0 where Steps 2-3 do not run), differing pixels."""
    params = DHRParams()
    out = []
    cams, feats = job.ds.open()
    with cams, feats:
        for image_id in image_ids:
            img = common.load_image(job.ds, image_id, (cams, feats), job.preset, job.prototypes, params)
            diff = 0.0
            ours, theirs = resume(img.seeded, params), resume(img.seeded, params)
            if ours.next is Stage.HEAT_MAPS:
                lab_heat.rebalance_heat([ours], params)
                rebalance_heat([theirs], params)
                same = ours.heat.shape == theirs.heat.shape and ours.groups == theirs.groups
                diff = float((ours.heat - theirs.heat).abs().max()) if same else float("inf")
            mask = variants.mask_of(img, "main", True)
            out.append((image_id, diff, int((mask != read_mask(job.masks / f"{image_id}.png")).sum())))
    return out


def prototypes_diff(job: Job) -> float | None:
    """Max |lab prototypes - refine's saved file| over every source (None: no file there)."""
    path = job.masks / FILE_NAME
    if not path.exists():
        return None
    theirs = load(path, num_classes=job.preset.num_classes, wss=True)[0]
    pairs = list(zip((job.prototypes.uss, *job.prototypes.wss), (theirs.uss, *theirs.wss)))
    if len(pairs) != 1 + len(theirs.wss) or any(a.shape != b.shape for a, b in pairs):
        return float("inf")
    return max(float(torch.as_tensor(np.abs(a - b)).max()) for a, b in pairs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="camvid, ccp, or NAME=DIR[,CLASSES]")
    parser.add_argument("--masks", type=Path, required=True, help="refine's output directory (package defaults)")
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("-j", "--workers", type=int, default=2)
    args = parser.parse_args()
    ds = common.dataset(args.data, args.data_root)
    ids = ds.ids()
    job = Job(ds, args.masks, ds.preset(), common.prototypes(ds))
    proto = prototypes_diff(job)
    chunks = [ids[i : i + 2] for i in range(0, len(ids), 2)]
    rows = [r for part in map_chunks(partial(check, job), chunks, workers=args.workers) for r in part]
    heat = max(r[1] for r in rows)
    differ = [(i, n) for i, _, n in rows if n]
    print(f"{ds.name}: {len(rows)} images; prototypes vs refine's {FILE_NAME}: "
          f"{'no file' if proto is None else f'max |diff| {proto:g}'}; lab vs package heat maps: max |diff| {heat:g}; "
          f"masks differing from {args.masks}: {len(differ)} ({sum(n for _, n in differ)} pixels)")
    for image_id, n in differ[:10]:
        print(f"  {image_id}: {n} pixels")
    return 0 if heat == 0 and not differ and not proto else 1


if __name__ == "__main__":
    sys.exit(main())
