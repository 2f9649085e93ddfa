"""Copy the first N images of a benchmark folder (cams.h5, feats.h5, gt/) into a smaller one.

    python benchmarks/subset.py /path/to/camvid-val .gpu/camvid-40 --images 40
    python benchmarks/subset.py .gpu/camvid-40 /tmp/camvid-2000 --images 40 --repeat 50

The groups are copied as they are stored (compression and dtypes kept), with the root
attributes, so the subset is a valid contract pair; ``gt/<id>.png`` and ``ids.txt`` follow.
Used to carry real data to a machine that cannot see the full folder (benchmarks/gpu_check.sh).
``--repeat R`` also lists every image under R - 1 more ids (``<id>_r1`` ...), as HDF5 hard links
to the same datasets: a large input for throughput runs at no cost in disk.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import h5py


def copy_file(source: Path, target: Path, ids: list[str], repeat: int = 1) -> None:
    with h5py.File(source, "r") as src, h5py.File(target, "w") as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        for image_id in ids:
            src.copy(src[image_id], dst, name=image_id)
            for copy in range(1, repeat):
                dst[f"{image_id}_r{copy}"] = dst[image_id]  # a hard link: the same group


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--images", type=int, required=True)
    parser.add_argument("--repeat", type=int, default=1, help="list every image under this many ids")
    args = parser.parse_args()
    with h5py.File(args.source / "cams.h5", "r") as cams:
        ids = sorted(cams.keys())[: args.images]
    args.target.mkdir(parents=True, exist_ok=True)
    for name in ("cams.h5", "feats.h5"):
        copy_file(args.source / name, args.target / name, ids, args.repeat)
    if (args.source / "gt").is_dir():
        (args.target / "gt").mkdir(exist_ok=True)
        for image_id in ids:
            shutil.copyfile(args.source / "gt" / f"{image_id}.png", args.target / "gt" / f"{image_id}.png")
    (args.target / "ids.txt").write_text("\n".join(ids) + "\n")
    print(f"{len(ids)} images -> {args.target}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
