"""How alike two feats files' USS features are, whatever their basis: per image, the Pearson
correlation between the cell-to-cell cosine similarities of the two maps (invariant to a rotation
or a change of dimension of the features), averaged over the images both files hold.

    python benchmarks/uss_agreement.py ours-feats.h5 /path/to/camvid-val/feats.h5

Prints one JSON document: images, mean, min, max of the correlation.
"""
from __future__ import annotations

import argparse
import json

import h5py
import numpy as np


def cosines(uss: np.ndarray) -> np.ndarray:
    cells = uss.reshape(uss.shape[0], -1).T.astype(np.float64)
    cells /= np.maximum(np.linalg.norm(cells, axis=1, keepdims=True), 1e-12)
    return cells @ cells.T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first")
    parser.add_argument("second")
    args = parser.parse_args()
    scores = []
    with h5py.File(args.first, "r") as a, h5py.File(args.second, "r") as b:
        for image_id in sorted(set(a) & set(b)):
            if "uss" not in a[image_id] or "uss" not in b[image_id]:
                continue
            ua, ub = a[image_id]["uss"][()], b[image_id]["uss"][()]
            if ua.shape[1:] != ub.shape[1:]:
                raise SystemExit(f"{image_id}: grids differ, {ua.shape[1:]} vs {ub.shape[1:]}")
            scores.append(float(np.corrcoef(cosines(ua).ravel(), cosines(ub).ravel())[0, 1]))
    print(json.dumps({"images": len(scores), "mean": round(float(np.mean(scores)), 4),
                      "min": round(min(scores), 4), "max": round(max(scores), 4)}))


if __name__ == "__main__":
    main()
