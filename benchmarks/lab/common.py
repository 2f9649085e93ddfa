"""The lab's data: a val set's images, their Step 1 cached, the class prototypes, the scoring.

Step 1 (seed scores, M_seed, M_init, the restored tags) runs once per image with 0.4's
defaults and main's own stage functions, and is kept in ``benchmarks/lab/.cache/<set>/step1/``
(ignored by git), so every Steps 2-3 variant costs its heat maps and the final CRF only.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one BLAS thread per process, as refine's workers

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dhr_label.core.crf import image_crf
from dhr_label.core.dhr import integrate, seed_mask, seed_scores
from dhr_label.core.pipeline import ImageState, Stage, advance, seed_transport, start
from dhr_label.core.prototypes import Prototypes
from dhr_label.io.contract import CamsFile, FeatsFile
from dhr_label.io.inputs import load_inputs
from dhr_label.io.masks import read_mask
from dhr_label.metrics import confusion_matrix, vanished_classes
from dhr_label.params import DHRParams
from dhr_label.presets import preset_from_classes, resolve_preset
from dhr_label.runtime.prototypes import PoolJob, pool

LAB = Path(__file__).resolve().parent
CACHE = LAB / ".cache"
SHARED = Path("/work/shared/data")  # the default data root; --data overrides (benchmarks may read it)


@dataclass(frozen=True)
class DataSet:
    """One labelled val set in the contract format."""

    name: str
    root: Path
    classes: str | None = None  # preset name or class-list file; None: the cams file's

    @property
    def cache(self) -> Path:
        return CACHE / self.name

    def preset(self):
        if self.classes:
            return resolve_preset(self.classes)
        with CamsFile.open(self.root / "cams.h5") as cams:
            return preset_from_classes(cams.classes, cams.background)

    def ids(self) -> list[str]:
        with CamsFile.open(self.root / "cams.h5") as cams:
            return sorted(cams.ids())


def dataset(name: str, root: Path | None = None) -> DataSet:
    """``camvid`` / ``ccp`` (the shared val sets) or ``NAME=DIR[,CLASSES]`` for another set."""
    if "=" in name:
        name, spec = name.split("=", 1)
        path, _, classes = spec.partition(",")
        return DataSet(name, Path(path), classes or None)
    data = root or SHARED
    if name == "camvid":
        return DataSet("camvid", data / "camvid-val")
    if name == "ccp":
        return DataSet("ccp", data / "ccp-val", str(data / "ccp-val" / "classes.txt"))
    raise SystemExit(f"unknown data set {name!r}: camvid, ccp or NAME=DIR[,CLASSES]")


@dataclass
class Image:
    """One image: its inputs, Step 1 (0.4's defaults), the ground truth, the dataset state."""

    image_id: str
    state: ImageState  # after SEED_MASK: scores, seed, init, restored, classes (None: M_init is final)
    gt: np.ndarray
    num_classes: int
    background: int | None
    crf: object = None  # the image's DenseCRF (pydensecrf), built on first use
    params: DHRParams = field(default_factory=DHRParams)
    extra: dict = field(default_factory=dict)  # dataset-level state of a variant (models)

    def image_crf(self):
        if self.crf is None:
            self.crf = image_crf(self.state.image, self.params.crf)
        return self.crf

    def score(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As ``tune``/``score``: the int64 confusion, eligible and vanished classes."""
        confusion = confusion_matrix(mask, self.gt, num_classes=self.num_classes, ignore_index=255)
        eligible, vanished = vanished_classes(confusion)
        return confusion, eligible, vanished


def step1(ds: DataSet, image_id: str, cams: CamsFile, feats: FeatsFile, preset, prototypes) -> Image:
    """One image with Step 1 from the cache, computed (main's stage functions) when missing."""
    params = DHRParams()
    inputs = load_inputs(image_id, cams, feats, uss=True, wss=True)
    state = start(ImageState(inputs.cam, inputs.labels, inputs.image, inputs.base, inputs.uss, inputs.wss,
                             preset.background, prototypes), params)
    path = ds.cache / "step1" / f"{image_id}.npz"
    image = Image(image_id, state, read_mask(ds.root / "gt" / f"{image_id}.png"), preset.num_classes, preset.background)
    if path.exists():
        with np.load(path) as z:
            state.scores, state.seed, state.init = z["scores"], z["seed"], z["init"]
            state.restored = z["restored"].tolist()
    else:
        state.scores = seed_scores(state.cam, seed_transport(state, params), params)
        state.seed = seed_mask(state.scores, state.labels, state.background, params, image.image_crf())
        state.init, state.restored = integrate(state.seed, state.base, state.labels, params.rho)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, scores=state.scores, seed=state.seed, init=state.init,
                            restored=np.asarray(state.restored, np.int64))
        tmp.replace(path)
    state.next = Stage.SEED_MASK  # the stage just run: advance decides whether Steps 2-3 run
    advance(state, params)
    return image


def prototypes(ds: DataSet) -> Prototypes:
    """The class prototypes refine pools (base masks of every image), cached."""
    path = ds.cache / "prototypes.npz"
    if path.exists():
        with np.load(path) as z:
            layers = sorted((n for n in z.files if n.startswith("wss_")), key=lambda n: int(n[4:]))
            return Prototypes(uss=z["uss"], wss=tuple(z[n] for n in layers))
    preset = ds.preset()
    run = pool(PoolJob(ds.root / "cams.h5", ds.root / "feats.h5", preset.num_classes, wss=True), workers=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    p = run.prototypes
    np.savez(path, uss=p.uss, **{f"wss_{k}": layer for k, layer in enumerate(p.wss)})
    return p


def open_files(ds: DataSet):
    return CamsFile.open(ds.root / "cams.h5"), FeatsFile.open(ds.root / "feats.h5")
