"""The lab's data: a val set, Step 1 of each image cached, the class prototypes, the scoring.

Step 1 (seed scores, M_seed, M_init, the restored tags) runs once per image through the
package's own stages (``run_stages(..., until=Stage.HEAT_MAPS)``, as ``dhr-label tune`` runs
it) and is kept in ``benchmarks/lab/.cache/<set>/step1-<key>/<id>.npz`` (ignored by git), the
key standing for the Step-1 settings (``pipeline.step1_settings``); every Steps 2-3 variant
then resumes from it (``pipeline.resume``) and costs its heat maps and the final DenseCRF only.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one thread per process, as refine's workers

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dhr_label.core.pipeline import ImageState, Stage, new_state, start, step1_settings
from dhr_label.core.prototypes import Prototypes
from dhr_label.core.stages import CRFCache, run_stages
from dhr_label.core.tensors import to_device, to_host
from dhr_label.io.contract import CamsFile, FeatsFile
from dhr_label.io.inputs import load_inputs
from dhr_label.io.masks import read_mask
from dhr_label.metrics import confusion_matrix, vanished_classes
from dhr_label.params import DHRParams
from dhr_label.presets import Preset, preset_from_classes, resolve_preset
from dhr_label.runtime.prototypes import PoolJob, RunPrototypes, load, pool, save

LAB = Path(__file__).resolve().parent
CACHE = LAB / ".cache"
DEFAULTS = DHRParams()  # the package defaults, refine's
SHARED = Path("/work/shared/data")  # the default data root (benchmarks may read it); NAME=DIR for another set
# The lab's workers (loky processes of the package's map_chunks) import its modules by name.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(LAB), os.environ.get("PYTHONPATH")]))


@dataclass(frozen=True)
class DataSet:
    """One labelled val set in the contract format (``cams.h5``, ``feats.h5``, ``gt/<id>.png``).

    Attributes
    ----------
    name : str
        Names its cache folder.
    root : Path
    classes : str or None
        A preset name or class-list file (``--classes``); None: the cams file's own.
    """

    name: str
    root: Path
    classes: str | None = None

    @property
    def cache(self) -> Path:
        return CACHE / self.name

    @property
    def gt(self) -> Path:
        return self.root / "gt"

    def preset(self) -> Preset:
        """The classes, as ``refine --classes`` (or the cams file) gives them."""
        if self.classes:
            return resolve_preset(self.classes)
        with CamsFile.open(self.root / "cams.h5") as cams:
            return preset_from_classes(cams.classes, cams.background)

    def ids(self) -> list[str]:
        with CamsFile.open(self.root / "cams.h5") as cams:
            return sorted(cams.ids())

    def open(self) -> tuple[CamsFile, FeatsFile]:
        return CamsFile.open(self.root / "cams.h5"), FeatsFile.open(self.root / "feats.h5")


def dataset(name: str, root: Path | None = None) -> DataSet:
    """``camvid`` / ``ccp`` (the val sets under ``root``, default ``SHARED``) or
    ``NAME=DIR[,CLASSES]`` for another labelled set in the contract format."""
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
    """One image after Step 1: the seeded state (``resume`` it per variant), its ground truth.

    Attributes
    ----------
    image_id : str
    seeded : ImageState
        After SEED_MASK (``next`` is SEED_MASK: :func:`~dhr_label.core.pipeline.resume` decides).
    gt : ndarray, shape (H, W), uint8
    num_classes : int
    crfs : dict
        The image's DenseCRFs (a :class:`CRFCache` per CRF setting), built on first use.
    """

    image_id: str
    seeded: ImageState
    gt: np.ndarray
    num_classes: int
    crfs: dict = field(default_factory=dict)

    def crf(self, params: DHRParams):
        """The image's DenseCRF under ``params.crf`` (the lattice is built once per setting)."""
        if params.crf not in self.crfs:
            self.crfs[params.crf] = CRFCache(params.crf)
        return self.crfs[params.crf].get([self.seeded.image])

    def gt_tensor(self) -> torch.Tensor:
        return to_device(self.gt, self.seeded.device)

    def score(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As ``score``/``tune``: the int64 confusion, the eligible and the vanished classes."""
        confusion = confusion_matrix(mask, self.gt, num_classes=self.num_classes, ignore_index=255)
        eligible, vanished = vanished_classes(confusion)
        return confusion, eligible, vanished


def step1_key(params: DHRParams) -> str:
    """A short digest of what decides Step 1 (variants that agree share one cached Step 1)."""
    return hashlib.sha1(repr(step1_settings(params)).encode()).hexdigest()[:10]


_FIELDS = ("scores", "seed", "init")  # the tensors SEED_SCORES and SEED_MASK fill in


def load_image(ds: DataSet, image_id: str, files, preset: Preset, prototypes: Prototypes | None,
               params: DHRParams = DEFAULTS) -> Image:
    """One image with Step 1 under ``params``: from the cache, or run by the package's stages
    (and its DenseCRF lattice kept for the final mask) and cached.

    Returns an :class:`Image` whose ``seeded.next`` is None when ``params`` skip Step 1
    (Table 6 row 1: ``seeded.mask`` is the base mask).
    """
    cams, feats = files
    inputs = load_inputs(image_id, cams, feats, uss=True, wss=True)
    state = start(new_state(inputs.cam, inputs.labels, inputs.image, inputs.base, inputs.uss, inputs.wss,
                            preset.background, prototypes, device="cpu"), params)
    image = Image(image_id, state, read_mask(ds.gt / f"{image_id}.png"), preset.num_classes)
    if state.next is None:
        return image
    path = ds.cache / f"step1-{step1_key(params)}" / f"{image_id}.npz"
    if path.exists():
        with np.load(path) as z:
            for name in _FIELDS:
                setattr(state, name, torch.from_numpy(z[name]))
            state.init_counts, state.restored = z["init_counts"], z["restored"].tolist()
        state.next = Stage.SEED_MASK  # the stage just run: resume() decides what comes next
        return image
    crfs = CRFCache(params.crf)
    run_stages([state], params, crfs=crfs, until=Stage.HEAT_MAPS)
    image.crfs[params.crf] = crfs
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **{name: to_host(getattr(state, name)) for name in _FIELDS},
                        init_counts=state.init_counts, restored=np.asarray(state.restored, np.int64))
    tmp.replace(path)
    state.next = Stage.SEED_MASK
    return image


def prototypes(ds: DataSet, source: str = "base") -> Prototypes:
    """The class prototypes, pooled by the package as ``refine`` pools them
    (``runtime.prototypes.pool``, every image): from the base masks (``source`` base, what
    refine uses) or from the ground truth (gt, an oracle: the ``gt/`` folder as the base
    masks). Cached in ``.cache/<set>/prototypes-<source>.npz``."""
    path = ds.cache / f"prototypes-{source}.npz"
    num_classes = ds.preset().num_classes
    if path.exists():
        return load(path, num_classes=num_classes, wss=True)[0]
    if source not in ("base", "gt"):
        raise SystemExit(f"unknown prototype source {source!r}: base or gt")
    job = PoolJob(ds.root / "cams.h5", ds.root / "feats.h5", num_classes, wss=True,
                  base_dir=ds.gt if source == "gt" else None)
    run: RunPrototypes = pool(job, workers=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    save(path, run, fingerprint_id=f"lab:{ds.name}:{source}")
    return run.prototypes


def with_prototypes(state: ImageState, protos: Prototypes | None) -> ImageState:
    """A shallow copy of ``state`` blending other prototypes (the tensors are shared)."""
    return dataclasses.replace(state, prototypes=protos)
