"""The names of the algorithm parameters on the command line, shared by ``refine``'s options and
``tune``'s ``--grid`` / ``--sample`` (which also take the dotted field names of DHRParams)."""
from __future__ import annotations

from ..params import DHRParams

#: refine option (without ``--``) -> dotted DHRParams field.
PARAM_OPTIONS = {
    "eps": "ot.eps", "ot-tol": "ot.tol", "ot-max-iter": "ot.max_iter", "gamma": "gamma", "rho": "rho", "tau": "tau",
    "cap": "cap", "marginal": "marginal_rebalance", "marginal-init": "marginal_init", "marginal-floor": "marginal_floor",
    "marginal-kl": "marginal_kl", "crf-iters": "crf.iterations", "crf-gauss-sxy": "crf.gauss_sxy",
    "crf-gauss-compat": "crf.gauss_compat", "crf-bi-sxy": "crf.bilateral_sxy", "crf-bi-srgb": "crf.bilateral_srgb",
    "crf-bi-compat": "crf.bilateral_compat", "crf-backend": "crf.backend", "guard": "guard",
    "guard-max-share": "guard_max_share", "guard-support": "guard_support", "ignore-below": "ignore_below",
    "prototype-weight": "prototype_weight", "wss-heat-weight": "wss_heat_weight",
    "support-temperature": "support_temperature", "support-prior": "support_prior", "size-passes": "size_passes",
    "colour-weight": "colour_weight",
    "ot": "steps.ot", "crf": "steps.crf", "uss": "steps.uss", "wss": "steps.wss",
}


def field_of(name: str) -> str:
    """The dotted field of a parameter named as a refine option or as the field itself."""
    name = name.strip().removeprefix("--")
    if name in PARAM_OPTIONS:
        return PARAM_OPTIONS[name]
    dotted = name.replace("-", "_")
    try:
        DHRParams().with_values({dotted: getattr_dotted(DHRParams(), dotted)})
    except (ValueError, AttributeError):
        known = ", ".join(sorted(PARAM_OPTIONS))
        raise ValueError(f"unknown parameter {name!r}; known: {known} (or a dotted field such as ot.eps)") from None
    return dotted


def getattr_dotted(params: DHRParams, dotted: str):
    value = params
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def parse_value(text: str):
    """``0.5`` -> 0.5, ``10`` -> 10, ``true`` -> True, anything else stays a string (an enum value)."""
    text = text.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text
