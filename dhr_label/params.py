"""The one place where DHR's algorithm parameters and their defaults live.

Every number comes from ``docs/algorithm.md`` (the paper, or the released code where the paper is
silent). The CLI fills a :class:`DHRParams`; nothing else keeps its own copy of a default.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field


class CapMode(str, enum.Enum):
    """How class-level average pooling (CAP) weighs a feature cell."""

    soft = "soft"  # by the fraction of the cell's pixels labelled with the class (ours)
    majority = "majority"  # by a majority vote per cell (the released code)


class CRFBackend(str, enum.Enum):
    """Which implementation computes the DenseCRF (both compute the same model)."""

    pydensecrf = "pydensecrf"  # Krähenbühl's C++ through pydensecrf (CPU)
    torch = "torch"  # ours: the permutohedral lattice in PyTorch, batched (CPU or GPU)


class CRFKernels(str, enum.Enum):
    """How the torch backend runs its mean-field iterations (the same marginals bit for bit)."""

    auto = "auto"  # triton on CUDA when Triton imports, eager elsewhere
    eager = "eager"  # torch operations (filtering.py, softmax.py)
    triton = "triton"  # fused Triton kernels (kernels.py; on the CPU under TRITON_INTERPRET=1)


class Marginal(str, enum.Enum):
    """Class marginal of an optimal-transport call."""

    uniform = "uniform"  # 1/K per class (the paper)
    area = "area"  # each class's share of M_init's pixels, floored, renormalised
    unbalanced = "unbalanced"  # KL-relaxed class marginal around the uniform one


@dataclass(frozen=True)
class Steps:
    """Ablation switches: which parts of DHR run (paper Table 6).

    ``ot``: OT re-weighting of the CAMs in Step 1; ``crf``: DenseCRF of the Step-1 seed;
    ``uss`` / ``wss``: the two rebalancing sources of Steps 2/3. ``init``: Step 1 runs at all
    (row 1 is the base mask unchanged).
    """

    init: bool = True
    ot: bool = True
    crf: bool = True
    uss: bool = True
    wss: bool = True

    @property
    def rebalance(self) -> bool:
        """Whether Steps 2/3 run (either feature source on, after Step 1)."""
        return self.init and (self.uss or self.wss)

    @property
    def needs_base(self) -> bool:
        """Whether every image must have a base mask (row 1 outputs it unchanged)."""
        return not self.init

    @property
    def needs_uss(self) -> bool:
        """Whether the USS features are read (Step 2, rows 5 and 7)."""
        return self.init and self.uss

    @property
    def needs_wss(self) -> bool:
        """Whether the WSS features are read (Step 3, rows 6 and 7)."""
        return self.init and self.wss

    @property
    def needs_features(self) -> bool:
        """Whether a feats file is needed at all."""
        return self.needs_uss or self.needs_wss

    @classmethod
    def row(cls, row: int) -> "Steps":
        """The switches of row ``row`` (1-7) of the paper's Table 6."""
        if row not in ABLATION_ROWS:
            raise ValueError(f"ablation row must be 1..7, got {row}")
        return ABLATION_ROWS[row]


ABLATION_ROWS: dict[int, Steps] = {
    1: Steps(init=False, ot=False, crf=False, uss=False, wss=False),
    2: Steps(ot=True, crf=False, uss=False, wss=False),
    3: Steps(ot=False, crf=True, uss=False, wss=False),
    4: Steps(ot=True, crf=True, uss=False, wss=False),
    5: Steps(ot=True, crf=True, uss=True, wss=False),
    6: Steps(ot=True, crf=True, uss=False, wss=True),
    7: Steps(),
}


@dataclass(frozen=True)
class CRFParams:
    """DenseCRF R_C: the released code's defaults (core/refinements/densecrf.py)."""

    iterations: int = 10
    gauss_sxy: float = 1.0
    gauss_compat: float = 3.0
    bilateral_sxy: float = 67.0
    bilateral_srgb: float = 3.0
    bilateral_compat: float = 4.0
    unary_clip: float = 1e-5
    backend: CRFBackend = CRFBackend.pydensecrf  # refine picks the default per device (README)
    # How the torch backend computes (not what: both give the same marginals bit for bit, so
    # the masks' fingerprint leaves it out); auto resolves per device (core/crf/fused.py).
    kernels: CRFKernels = CRFKernels.auto

    def __post_init__(self) -> None:
        _coerce_enums(self)


@dataclass(frozen=True)
class OTParams:
    """Entropic optimal transport f_OT (Eq. 2)."""

    eps: float = 0.1
    tol: float = 1e-5  # L1 error of the cell marginal, checked every ``check_every`` iterations
    max_iter: int = 1000
    check_every: int = 10
    minmax_clip: float = 1e-5  # denominator clip of the per-class min-max (released code)


@dataclass(frozen=True)
class DHRParams:
    """All parameters of one DHR refinement (docs/algorithm.md)."""

    ot: OTParams = field(default_factory=OTParams)
    crf: CRFParams = field(default_factory=CRFParams)
    steps: Steps = field(default_factory=Steps)
    gamma: float = 1.0  # background score exponent of Step 1 (CLIP-ES)
    rho: float = 0.5  # Step 1 integration: a tag is "lost" below this overlap ratio
    tau: float = 0.8  # Step 3 grouping threshold on USS centroid correlation
    cap: CapMode = CapMode.soft
    marginal_init: Marginal = Marginal.uniform  # class marginal of the Step-1 OT
    marginal_rebalance: Marginal = Marginal.area  # class marginal of the Step-2/3 OT calls
    # Floor of the ``area`` marginal before renormalising: a minor class keeps at least this
    # share of the OT mass (0.03 since 0.4; 0.01 before, which left the minor classes of a
    # dataset with a background too little, docs/algorithm.md).
    marginal_floor: float = 0.03
    marginal_kl: float = 0.1  # KL weight of the ``unbalanced`` marginal
    # Our addition, not in the paper: after Step 3, a class of M_init that kept less than this
    # fraction of its M_init region gets that region back (0 = off, the paper's behaviour; 0.5
    # with the prototypes below: fewer vanished classes on both real val sets, docs/algorithm.md)
    # -- only the pixels of the region where the class's upsampled heat map reaches
    # ``guard_support`` (0 = the whole region, 0.3's guard).
    guard: float = 0.5
    guard_max_share: float = 1.0  # only classes below this share of M_init's pixels are guarded
    guard_support: float = 0.15
    # Ours: pixels whose final DenseCRF marginal maximum is below this get the ignore label
    # (255), as WSSS pipelines blank uncertain pixels; 0 = off (every pixel gets a class).
    ignore_below: float = 0.0
    # Ours (docs/algorithm.md, "Class prototypes"): the Step 2/3 CAP centroids blended with
    # dataset-level class prototypes, (1 - w) * image centroid + w * prototype (unit vectors),
    # in rows 5 and 7; 0 = the paper's per-image centroids. refine pools the prototypes from
    # the base masks of every image of the cams file (or reads them from --prototypes).
    prototype_weight: float = 0.75
    # Ours: in full DHR (USS and WSS on), Step 2's heat maps become (1 - w) * S_us + w * S_ws,
    # min-max again, before the Step-3 groups; 0 = the paper (WSS only inside the groups).
    wss_heat_weight: float = 0.5
    # Ours (0.5, docs/algorithm.md, "Where a class's centroid comes from"): every Step 2/3 CAP
    # pools a class over M_init's cell fractions f times the class's posterior over Gamma at the
    # cell, (f + prior) * softmax(cos(x, c) / T) with c the image's (blended) USS centroids: the
    # cells of a coarse M_init blob that look like a neighbour leave the class's centroid.
    # 0 = M_init's fractions alone (the paper, 0.4). Only with USS on (its grid, its centroids).
    support_temperature: float = 0.05
    support_prior: float = 0.1
    # Ours (0.5): Steps 3.3-3.4 run 1 + size_passes times, the ``area`` marginal counted on
    # M_init, then on the previous pass's answer (the argmax of its upsampled H): M_init's class
    # sizes are off by large factors on small classes. 0 = M_init's counts only (the paper, 0.4).
    size_passes: int = 2
    # Ours (0.5): the upsampled H mixed with a per-image colour model of the classes before
    # the final DenseCRF, (1 - w) H + w P(class | colour) (core/rebalance.py colour_posterior);
    # 0 = H alone (the paper, 0.4). Only where the image is given.
    colour_weight: float = 0.1

    def __post_init__(self) -> None:
        _coerce_enums(self)
        problems = []
        if not self.ot.eps > 0:
            problems.append(f"eps must be > 0, got {self.ot.eps}")
        if not self.ot.tol > 0:
            problems.append(f"OT tol must be > 0, got {self.ot.tol}")
        if self.ot.max_iter < 1:
            problems.append(f"OT max_iter must be >= 1, got {self.ot.max_iter}")
        if not 0.0 <= self.rho <= 1.0:
            problems.append(f"rho must be in [0, 1], got {self.rho}")
        if not 0.0 <= self.tau <= 1.0:
            problems.append(f"tau must be in [0, 1], got {self.tau}")
        if not self.gamma > 0:
            problems.append(f"gamma must be > 0, got {self.gamma}")
        # > 0: a zero share is not a valid OT marginal (a tag absent from the mask gets one).
        if not 0.0 < self.marginal_floor < 1.0:
            problems.append(f"marginal floor must be in (0, 1), got {self.marginal_floor}")
        if not self.marginal_kl > 0:
            problems.append(f"marginal KL weight must be > 0, got {self.marginal_kl}")
        if not 0.0 <= self.guard <= 1.0:
            problems.append(f"guard must be in [0, 1], got {self.guard}")
        if not 0.0 < self.guard_max_share <= 1.0:
            problems.append(f"guard max share must be in (0, 1], got {self.guard_max_share}")
        if not 0.0 <= self.guard_support < 1.0:
            problems.append(f"guard support must be in [0, 1), got {self.guard_support}")
        if not 0.0 <= self.ignore_below <= 1.0:
            problems.append(f"ignore-below must be in [0, 1], got {self.ignore_below}")
        if not 0.0 <= self.prototype_weight <= 1.0:
            problems.append(f"prototype weight must be in [0, 1], got {self.prototype_weight}")
        if not 0.0 <= self.wss_heat_weight <= 1.0:
            problems.append(f"WSS heat weight must be in [0, 1], got {self.wss_heat_weight}")
        if not self.support_temperature >= 0.0:
            problems.append(f"support temperature must be >= 0 (0 = off), got {self.support_temperature}")
        if not 0.0 <= self.colour_weight <= 1.0:
            problems.append(f"colour weight must be in [0, 1], got {self.colour_weight}")
        if not self.support_prior >= 0.0:
            problems.append(f"support prior must be >= 0, got {self.support_prior}")
        if isinstance(self.size_passes, bool) or not isinstance(self.size_passes, int) or self.size_passes < 0:
            problems.append(f"size passes must be an integer >= 0, got {self.size_passes!r}")
        if self.crf.iterations < 0:
            problems.append(f"CRF iterations must be >= 0, got {self.crf.iterations}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def weighs_support(self) -> bool:
        """Whether Steps 2-3's CAP support is weighted by the class posterior (ours, USS on)."""
        return self.steps.uss and self.support_temperature > 0

    @property
    def size_pass_count(self) -> int:
        """Extra passes of Steps 3.3-3.4 that count the area marginal on the previous answer
        (none unless that marginal is ``area``: the others do not count pixels)."""
        return self.size_passes if self.marginal_rebalance is Marginal.area else 0

    @property
    def uses_prototypes(self) -> bool:
        """Whether Steps 2-3 blend class prototypes into their centroids (rows 5 and 7 with a
        ``prototype_weight``; the prototypes are pooled on the USS grid)."""
        return self.steps.needs_uss and self.prototype_weight > 0

    def to_dict(self) -> dict:
        """JSON-ready view (enums as their values), for manifests, fingerprints and params files.

        What decides the masks only: ``crf.kernels`` (how the torch CRF computes, the same
        marginals bit for bit) is left out; a run records it with its engine.
        """

        def plain(value):
            if isinstance(value, enum.Enum):
                return value.value
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return value

        data = plain(dataclasses.asdict(self))
        del data["crf"]["kernels"]
        return data

    def replace(self, **changes) -> "DHRParams":
        """A copy with ``changes`` applied (the dataclass is frozen)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict) -> "DHRParams":
        """The inverse of :meth:`to_dict`; keys left out keep their defaults.

        Raises ValueError naming an unknown key or a value out of range, e.g. for a params
        file written by hand or by another version.
        """
        return _build(cls, data, "")

    def with_values(self, values: dict) -> "DHRParams":
        """A copy with dotted fields set (``{"tau": 0.5, "ot.eps": 0.2, "cap": "majority"}``),
        checked as :meth:`from_dict` checks a file."""
        data = self.to_dict()
        data["crf"]["kernels"] = self.crf.kernels.value  # to_dict leaves it out: kept through the copy
        for dotted, value in values.items():
            *path, last = dotted.split(".")
            node = data
            for part in path:
                if not isinstance(node.get(part), dict):
                    raise ValueError(f"unknown parameter {dotted!r}")
                node = node[part]
            if last not in node:
                raise ValueError(f"unknown parameter {dotted!r}")
            node[last] = value.value if isinstance(value, enum.Enum) else value
        return DHRParams.from_dict(data)

    def differences(self, other: "DHRParams") -> list[str]:
        """``name: mine -> theirs`` for every field (dotted for nested) where the two differ."""
        mine, theirs = _flatten(self.to_dict()), _flatten(other.to_dict())
        return [f"{key}: {mine.get(key)} -> {theirs.get(key)}" for key in sorted(set(mine) | set(theirs))
                if mine.get(key) != theirs.get(key)]


#: Our additions to Steps 2-3 switched off, the paper's values (docs/algorithm.md, "Our additions
#: to Steps 2-3"): ``DHRParams().replace(**PAPER_STEPS_2_3)``; on the command line
#: ``--prototype-weight 0 --wss-heat-weight 0 --guard 0 --support-temperature 0 --size-passes 0
#: --colour-weight 0``.
PAPER_STEPS_2_3 = {"prototype_weight": 0.0, "wss_heat_weight": 0.0, "guard": 0.0, "support_temperature": 0.0, "size_passes": 0,
                   "colour_weight": 0.0}


def _coerce_enums(instance) -> None:
    """Enum fields given as their values (``cap="majority"``, ``backend="torch"``) become the
    enum members, so that comparisons by identity hold; an unknown value raises ValueError."""
    for f in dataclasses.fields(instance):
        default = f.default
        value = getattr(instance, f.name)
        if isinstance(default, enum.Enum) and not isinstance(value, type(default)):
            try:
                object.__setattr__(instance, f.name, type(default)(value))
            except ValueError:
                choices = ", ".join(m.value for m in type(default))
                raise ValueError(f"{f.name} must be one of {choices}, got {value!r}") from None


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _build(kind, data, prefix: str):
    """An instance of the dataclass ``kind`` from plain values (enums by value, nested dicts)."""
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'parameters'}: expected a mapping, found {data!r}")
    defaults = kind()
    known = [f.name for f in dataclasses.fields(kind)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(prefix + u for u in unknown)}; known: {', '.join(prefix + k for k in known)}")
    values = {}
    for name, value in data.items():
        default, where = getattr(defaults, name), prefix + name
        if dataclasses.is_dataclass(default):
            values[name] = _build(type(default), value, where + ".")
        elif isinstance(default, enum.Enum):
            try:
                values[name] = type(default)(value)
            except ValueError:
                choices = ", ".join(m.value for m in type(default))
                raise ValueError(f"{where}: expected one of {choices}, found {value!r}") from None
        elif isinstance(default, bool) != isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected {type(default).__name__}, found {value!r}")
        elif isinstance(default, int) and not isinstance(default, bool) and not float(value).is_integer():
            raise ValueError(f"{where}: expected an integer, found {value!r}")
        else:
            values[name] = type(default)(value)
    return kind(**values)
