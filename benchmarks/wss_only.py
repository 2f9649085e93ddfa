"""Copy a feats file without its USS features: the WSS layers alone, as an IRN or CLIP-ES run that
dumped its network's features (and `dhr-label pack --wss-npy`) would give.

    python benchmarks/wss_only.py /path/to/camvid-val/feats.h5 camvid-wss.h5

`dhr-label features` then adds USS features of its own beside those layers
(README, "Results: dhr-label features on the real val sets").
"""
from __future__ import annotations

import argparse
from pathlib import Path

import h5py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a dhr-label/feats file with uss and wss")
    parser.add_argument("target", type=Path, help="the feats file to write (replaced)")
    args = parser.parse_args()
    with h5py.File(args.source, "r") as src, h5py.File(args.target, "w") as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        copied = 0
        for image_id, group in src.items():
            if "wss" in group:
                src.copy(group["wss"], dst.require_group(image_id), name="wss")
                copied += 1
    print(f"{copied} images' WSS layers -> {args.target}")


if __name__ == "__main__":
    main()
