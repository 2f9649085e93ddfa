"""Time per image of 0.4's DHR and of the recommended Steps 2-3, in one process, interleaved.

    nice -n 10 .venv/bin/python benchmarks/lab/cost.py camvid [--limit 20] [--colour 0.1]

Per image, both run from the inputs (Step 1 with its CRF, Steps 2-3, the final CRF and the
guard; main's stage functions, one BLAS thread): 0.4's ``rebalance_heat`` against
``winner.rebalance_heat`` (and the colour model when ``--colour``). The order alternates image by
image so that a shared machine's load falls on both alike; the ratio is of the summed seconds.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from threadpoolctl import threadpool_limits  # noqa: E402

import common  # noqa: E402
import final as lab_final  # noqa: E402
import winner  # noqa: E402
from dhr_label.core import dhr  # noqa: E402
from dhr_label.core.crf import image_crf  # noqa: E402
from dhr_label.core.pipeline import ImageState, Stage, advance, seed_transport, start  # noqa: E402
from dhr_label.io.inputs import load_inputs  # noqa: E402
from dhr_label.params import DHRParams  # noqa: E402


def one(inputs, preset, protos, heat_fn, colour: float) -> float:
    params = DHRParams()
    t = time.perf_counter()
    state = start(ImageState(inputs.cam, inputs.labels, inputs.image, inputs.base, inputs.uss, inputs.wss,
                             preset.background, protos), params)
    crf = image_crf(inputs.image, params.crf)
    state.scores = dhr.seed_scores(state.cam, seed_transport(state, params), params)
    state.seed = dhr.seed_mask(state.scores, state.labels, state.background, params, crf)
    state.init, state.restored = dhr.integrate(state.seed, state.base, state.labels, params.rho)
    state.next = Stage.SEED_MASK
    advance(state, params)
    if state.next is not None:
        heat = heat_fn(state, params)
        if colour > 0:
            lab_final.final_mask(heat, state.classes, state.init, state.image, params, crf, colour=colour)
        else:
            dhr.final_mask(heat, state.classes, state.init, params, crf)
    return time.perf_counter() - t


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--colour", type=float, default=0.0)
    args = parser.parse_args()
    ds = common.dataset(args.data)
    preset, protos = ds.preset(), common.prototypes(ds)
    old = lambda state, params: dhr.rebalance_heat(state, params)[0]  # noqa: E731
    new = winner.rebalance_heat
    totals = [0.0, 0.0]
    cams, feats = common.open_files(ds)
    with threadpool_limits(1), cams, feats:
        for n, image_id in enumerate(ds.ids()[: args.limit]):
            inputs = load_inputs(image_id, cams, feats, uss=True, wss=True)
            order = [(0, old, 0.0), (1, new, args.colour)]
            for slot, fn, colour in order if n % 2 == 0 else order[::-1]:
                totals[slot] += one(inputs, preset, protos, fn, colour)
    n = min(args.limit, len(ds.ids()))
    print(f"{ds.name}, {n} images, one process: 0.4 {totals[0] / n:.3f} s/image, recommended "
          f"{totals[1] / n:.3f} s/image{f' (colour {args.colour})' if args.colour else ''}: x{totals[1] / totals[0]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
