"""Check the lab against main: the cached Step 1 and the lab's Steps 2-3 give refine's masks.

    nice -n 10 .venv/bin/python benchmarks/lab/check.py camvid --masks DIR [-j 2]

``DIR``: the masks of ``dhr-label refine`` with 0.4's defaults on the same set. Per image: the
lab's heat maps (no hooks) must equal main's ``rebalance_heat`` exactly, and the final mask
(main's ``final_mask`` with the DenseCRF) must equal refine's PNG byte for byte.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

import common  # noqa: E402
import heat as lab_heat  # noqa: E402
import variants  # noqa: E402
from dhr_label.core import dhr  # noqa: E402
from dhr_label.io.masks import read_mask  # noqa: E402
from dhr_label.params import DHRParams  # noqa: E402

_JOB: dict = {}


def check(image_ids: list[str]) -> list[tuple[str, float, int]]:
    ds, masks = _JOB["ds"], _JOB["masks"]
    out = []
    cams, feats = common.open_files(ds)
    with threadpool_limits(1), cams, feats:
        for image_id in image_ids:
            img = common.step1(ds, image_id, cams, feats, _JOB["preset"], _JOB["prototypes"])
            heat_diff = 0.0
            if img.state.next is not None:
                ours = lab_heat.rebalance_heat(img.state, DHRParams())
                theirs = dhr.rebalance_heat(img.state, DHRParams())[0]
                heat_diff = float(np.abs(ours - theirs).max())
            mask = variants.mask_of(img, "main", True)
            out.append((image_id, heat_diff, int((mask != read_mask(masks / f"{image_id}.png")).sum())))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data")
    parser.add_argument("--masks", type=Path, required=True)
    parser.add_argument("-j", "--workers", type=int, default=2)
    args = parser.parse_args()
    ds = common.dataset(args.data)
    ids = ds.ids()
    _JOB.update(ds=ds, masks=args.masks, preset=ds.preset(), prototypes=common.prototypes(ds))
    chunks = [ids[i : i + 2] for i in range(0, len(ids), 2)]
    with mp.get_context("fork").Pool(args.workers) as pool:
        rows = [r for part in pool.map(check, chunks, chunksize=1) for r in part]
    heat = max(r[1] for r in rows)
    differ = [(i, n) for i, _, n in rows if n]
    print(f"{ds.name}: {len(rows)} images; lab vs main heat maps: max |diff| {heat:g}; "
          f"masks differing from {args.masks}: {len(differ)} ({sum(n for _, n in differ)} pixels)")
    return 0 if heat == 0 and not differ else 1


if __name__ == "__main__":
    sys.exit(main())
