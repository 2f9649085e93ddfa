"""Generated scenes with their ground truth, for the lab: ``benchmarks/make_inputs.py``'s
contract files plus ``gt/<id>.png`` (the truth label map each scene was drawn from).

    nice -n 10 .venv/bin/python benchmarks/lab/scenes.py OUT N --scale tiny|voc [--seed 0]
    nice -n 10 .venv/bin/python benchmarks/lab/run.py tiny=OUT,voc main ... -j 2

make_inputs draws image i from ``default_rng([seed, i])`` and the scene (truth, tags, image)
first, so the truth is regenerated here with the same draws.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent


def make_inputs():
    spec = importlib.util.spec_from_file_location("make_inputs", HERE.parent / "make_inputs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_inputs"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("count", type=int)
    parser.add_argument("--scale", default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    mi = make_inputs()
    ids = mi.generate(args.out, args.count, scale=args.scale, seed=args.seed)
    spec = mi.SCALES[args.scale]
    preset = mi.preset_of(spec)
    shared = np.random.default_rng([args.seed])
    colours = shared.uniform(30, 225, size=(256, 3)).astype(np.float32)
    groups = max(2, preset.num_classes // 3)
    (args.out / "gt").mkdir(exist_ok=True)
    for i, image_id in enumerate(ids):
        truth, _, _ = mi.scene(np.random.default_rng([args.seed, i]), spec, colours, groups)
        Image.fromarray(truth).save(args.out / "gt" / f"{image_id}.png")
    print(f"{len(ids)} {args.scale} scenes with ground truth in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
