"""Per-image class centroid estimators for Steps 2-3 (candidates for main's stage code)."""
from __future__ import annotations

import numpy as np

from dhr_label.core.cap import class_centroids, l2_normalise


def shrunk_centroids(features: np.ndarray, weights: np.ndarray, prototypes: np.ndarray | None, kappa: float) -> np.ndarray:
    """Each class's CAP centroid shrunk towards its prototype by the size of its support.

    ``c_k = (1 - a_k) l2(mean_k) + a_k l2(p_k)`` with ``a_k = kappa / (m_k + kappa)``, where
    ``mean_k`` is the CAP mean of the features over the weights (``class_centroids``), ``m_k``
    the class's CAP mass (its support in feature cells) and ``p_k`` its prototype: the posterior
    mean of a class mean with the prototype as prior worth ``kappa`` cells. A class with a large
    region (sky, road, a dataset's background) keeps its own appearance; a small region (a sign,
    a belt: a blob around the object) leans on the dataset's class model. A class without
    support takes its prototype; one without prototype (a zero row) keeps its own mean.

    Parameters
    ----------
    features : (D, N) array
    weights : (G, N) array, non-negative (CAP weights)
    prototypes : (G, D) array or None
    kappa : float >= 0, in feature cells (0: the image's own means, the paper)

    Returns
    -------
    (G, D) float array: directions (heat maps are cosines); zero for a class with neither.
    """
    local, present = class_centroids(features, weights)
    if prototypes is None or kappa <= 0:
        return local
    mass = weights.sum(axis=1)
    share = (kappa / (mass + kappa))[:, None]
    unit_local, unit_proto = l2_normalise(local, -1), l2_normalise(prototypes, -1)
    has_proto = (prototypes * prototypes).sum(-1) > 0
    mixed = (1.0 - share) * unit_local + share * unit_proto
    own = np.where(present[:, None], unit_local, unit_proto)
    return np.where((present & has_proto)[:, None], mixed, own)


def em_class_model(
    features: np.ndarray, fractions: np.ndarray, prototypes: np.ndarray | None, blend: float,
    kappa: float, eps: float, iters: int,
) -> tuple[np.ndarray, np.ndarray]:
    """A per-image von Mises-Fisher mixture over the image's classes, anchored by M_init.

    Cell n belongs to class k with responsibility ``r_k(n) ∝ pi_k s_k(n) exp(kappa cos(x_n, mu_k))``:
    ``s_k(n) = (1 - eps) f_k(n) + eps / G`` is M_init's soft fraction of the class in the cell
    (the spatial prior: a cell may leave its M_init class when its features say so), ``pi_k``
    the class's share of the image, ``mu_k`` its mean direction: the CAP mean over the
    responsibilities blended with the class prototype as Steps 2-3 blend it. ``iters`` EM
    rounds from ``r = f``.

    Parameters
    ----------
    features : (D, N) array, the USS cells
    fractions : (G, N) array, M_init's soft CAP fractions of Gamma's classes
    prototypes : (G, D) array or None; blend : float in [0, 1]
    kappa : float, the vMF concentration (1 / temperature of the cosines)
    eps : float in (0, 1], how far a cell may leave its M_init class
    iters : int

    Returns
    -------
    r : (G, N) float32, the responsibilities (CAP weights for every feature source)
    pi : (G,) float64, the class shares of the image (the area marginal)
    """
    g, n = fractions.shape
    unit = l2_normalise(features.astype(np.float64), 0)
    labelled = fractions.sum(0, keepdims=True)
    frac = np.where(labelled > 0, fractions / np.maximum(labelled, 1e-12), 1.0 / g)  # ignore cells: no prior
    log_prior = np.log((1.0 - eps) * frac + eps / g)
    r = fractions.astype(np.float64)
    pi = r.sum(1) / max(r.sum(), 1e-12)
    for _ in range(iters):
        local, present = class_centroids(unit, r)
        if prototypes is not None and blend > 0:
            from dhr_label.core.cap import blend_centroids

            mu = blend_centroids(local, present, prototypes.astype(np.float64), blend)
        else:
            mu = local
        logit = np.log(np.maximum(pi, 1e-12))[:, None] + log_prior + kappa * (l2_normalise(mu, 1) @ unit)
        logit -= logit.max(0, keepdims=True)
        r = np.exp(logit)
        r /= r.sum(0, keepdims=True)
        pi = r.mean(1)
    return r.astype(np.float32), pi
