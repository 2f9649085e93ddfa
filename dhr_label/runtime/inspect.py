"""``inspect``: refine's input stage run dry over every image, plus a summary of the files.

Each image goes through :func:`dhr_label.io.inputs.load_inputs` (the very checks refine
applies), so an image inspect passes is one refine can read, and the message for one it
cannot is the one refine would give. What refine adapts (an RGBA image, NaN feature cells)
comes back as a warning. The summary (counts, sizes, dtypes, compression, class frequencies)
reads dataset metadata only, besides the arrays the checks load one image at a time.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.contract import EMPTY, CamsFile, FeatsFile, one_file
from ..io.inputs import load_inputs
from ..presets import Preset, check_agreement, preset_from_classes


@dataclass(frozen=True)
class Finding:
    """One problem: an ``error`` (refine would fail the image) or a ``warning`` (it adapts)."""

    severity: str
    image_id: str | None
    source: str
    problem: str

    def __str__(self) -> str:
        where = f"{self.image_id}: {self.source}" if self.image_id else self.source
        return f"{where}: {self.problem}"


@dataclass
class InspectReport:
    """What ``inspect`` found: counts, shapes, frequencies and every finding."""

    files: list[dict]
    preset: Preset
    ignore_index: int
    images: int = 0
    counts: Counter = field(default_factory=lambda: Counter(
        {"readable": 0, "with base": 0, "without base (seed only)": 0}))
    image_sizes: Counter = field(default_factory=Counter)  # (H, W) -> images
    datasets: dict[str, Counter] = field(default_factory=dict)  # name -> "shape dtype" -> images
    compression: dict[str, Counter] = field(default_factory=dict)
    tags_per_image: Counter = field(default_factory=Counter)
    tagged_images: np.ndarray | None = None  # (C,) images tagged with each class
    base_histogram: np.ndarray = field(default_factory=lambda: np.zeros(256, dtype=np.int64))
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    def to_dict(self) -> dict:
        """JSON-ready summary and findings."""
        base_total = int(self.base_histogram.sum())
        share = (lambda n: int(n) / base_total) if base_total else (lambda n: None)
        return {
            "files": self.files,
            "classes": {"preset": self.preset.name, "count": self.preset.num_classes,
                        "background": self.preset.background, "ignore_index": self.ignore_index},
            "images": self.images,
            "counts": dict(sorted(self.counts.items())),
            "image_sizes": {f"{h} x {w}": n for (h, w), n in self.image_sizes.most_common()},
            "datasets": {k: dict(v.most_common()) for k, v in sorted(self.datasets.items())},
            "compression": {k: dict(v.most_common()) for k, v in sorted(self.compression.items())},
            "tags_per_image": {str(k): n for k, n in sorted(self.tags_per_image.items())},
            "class_frequency": [
                {"id": i, "name": name, "tagged_images": int(self.tagged_images[i]),
                 "base_pixel_share": share(self.base_histogram[i])}
                for i, name in enumerate(self.preset.classes)
            ],
            "base_ignore_share": share(self.base_histogram[255]),
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "findings": [{"severity": f.severity, "id": f.image_id, "source": f.source,
                          "problem": f.problem} for f in self.findings],
        }


def inspect_inputs(
    cams: Path,
    feats: Path | None = None,
    *,
    images_dir: Path | None = None,
    base_dir: Path | None = None,
    preset: Preset | None = None,
    on_total: Callable[[int], None] | None = None,
    on_image: Callable[[int], None] | None = None,
) -> InspectReport:
    """Check every image of ``cams`` (and ``feats``) as refine would read it.

    File-level faults (missing, not HDF5, wrong ``format`` / ``version``, bad root attributes,
    classes that disagree with ``preset``) raise :class:`~dhr_label.errors.FileLevelError`;
    everything about one image becomes a :class:`Finding`. Without ``feats`` the feature
    datasets are not required (Step 1 alone). ``on_total(n)`` hears the image count once,
    ``on_image(1)`` each image done.
    """
    cams, feats = Path(cams), (Path(feats) if feats is not None else None)
    same = one_file(cams, feats)
    features = feats is not None
    with CamsFile.open(cams, combined=same) as cf:
        if preset is not None:
            check_agreement(preset, cf.classes, cf.background, str(cams))
        else:
            preset = preset_from_classes(cf.classes, cf.background)
        ff = FeatsFile.open(feats, combined=same) if feats is not None else None
        try:
            metadata = [cf] + ([ff] if ff is not None and not same else [])
            report = InspectReport([f.summary() for f in metadata], preset, cf.ignore_index,
                                   tagged_images=np.zeros(preset.num_classes, dtype=np.int64))
            ids = cf.ids()
            if not ids:
                report.findings.append(Finding("error", None, str(cams), EMPTY))
            if on_total is not None:
                on_total(len(ids))
            if ff is not None and not same:
                for image_id in sorted(set(ff.ids()) - set(ids)):
                    report.findings.append(Finding("error", image_id, str(cams), f"no group /{image_id} (it is in {feats})"))
            for image_id in ids:
                for handle in metadata:
                    _metadata(report, handle.layout(image_id))
                _one_image(report, image_id, cf, ff, features, images_dir, base_dir)
                if on_image is not None:
                    on_image(1)
        finally:
            if ff is not None:
                ff.close()
    return report


def _one_image(report: InspectReport, image_id, cf, ff, features: bool, images_dir, base_dir) -> None:
    report.images += 1
    try:
        inputs = load_inputs(image_id, cf, ff, uss=features, wss=features, images_dir=images_dir, base_dir=base_dir)
    except InputError as exc:
        report.findings.append(Finding("error", exc.image_id, exc.source, exc.problem))
        return
    for note in inputs.notes:
        report.findings.append(Finding("warning", image_id, str(cf.path), note))
    report.counts["readable"] += 1
    report.counts["with base" if inputs.base is not None else "without base (seed only)"] += 1
    report.image_sizes[inputs.image.shape[:2]] += 1
    report.tags_per_image[int(inputs.labels.size)] += 1
    report.tagged_images[inputs.labels] += 1
    if inputs.base is not None:
        report.base_histogram += np.bincount(inputs.base.ravel(), minlength=256)


def _metadata(report: InspectReport, layout) -> None:
    """Record shape, dtype and compression of every dataset of one group (no data read)."""
    for key, shape, dtype, compression in layout:
        text = " x ".join(map(str, shape))
        if key == "cam" and len(shape) == 3:  # K varies per image: the grid is what matters
            text = "K x " + " x ".join(map(str, shape[1:]))
        elif key == "labels":
            text = "K"
        report.datasets.setdefault(key, Counter())[f"{text} {dtype}"] += 1
        report.compression.setdefault(key, Counter())[compression] += 1
