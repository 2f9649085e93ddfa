"""Class-level average pooling (CAP, Appendix A.1), cosine heat maps (Eq. 3) and the class
correlations of Step 3.1, for a batch of images (a batch of one in a CPU worker).

Images of a batch differ in classes G and feature cells N: their maps are padded to
``[B, G, N]`` with masks of what is real, and padding never reaches a minimum or a maximum.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..params import OTParams
from .resize import cell_index, resize, resize_adjoint, resized_norms
from .tensors import WORK, length_mask, to_device, to_host


def cell_fractions(
    masks: list[torch.Tensor], classes: list, grids: list[tuple[int, int]], *, mode: str = "soft"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight of every feature cell for every class of every image: ``[B, G, N]`` and the valid
    cells ``[B, N]``.

    Parameters
    ----------
    masks : list of tensor, each (H_b, W_b), uint8
        Class ids; values not among the image's ``classes`` (e.g. 255 = ignore) count for none.
    classes : list of int arrays, each (G_b,)
        The class ids to pool per image, ascending; row g of image b is ``classes[b][g]``.
    grids : list of (h, w)
        Each image's feature grid; cell (i, j) covers rows ``[i*H/h, (i+1)*H/h)`` and columns
        ``[j*W/w, (j+1)*W/w)``.
    mode : {"soft", "majority"}
        ``soft``: the fraction of the cell's image pixels labelled with the class (a class
        thinner than a cell keeps a positive weight). ``majority``: 1 for the most frequent
        label of the cell (ignore included; ties to the lower id, and a tie with the
        unlabelled pixels to the class), 0 otherwise — the released code, which drops classes
        thinner than a cell.

    Notes
    -----
    One integer count over every pixel of the batch, pixel -> (image, class slot, cell):
    unlabelled pixels go to an extra slot G and padding to an extra cell N. Integer sums are
    exact whatever order the device adds them in.

    Examples
    --------
    >>> mask = torch.tensor([[0, 1, 1, 255]], dtype=torch.uint8)
    >>> weights, cells = cell_fractions([mask], [[0, 1]], [(1, 2)])
    >>> weights[0].tolist()
    [[0.5, 0.0], [0.5, 0.5]]
    """
    if mode not in ("soft", "majority"):
        raise ValueError(f"mode must be 'soft' or 'majority', got {mode!r}")
    device = masks[0].device
    g_max = max(len(c) for c in classes)
    n_max = max(h * w for h, w in grids)
    per_image = (g_max + 1) * (n_max + 1)
    index = []
    for b, (mask, ids, grid) in enumerate(zip(masks, classes, grids)):
        lookup = torch.full((256,), g_max, dtype=torch.int64, device=device)
        lookup[to_device(ids, device, torch.int64)] = torch.arange(len(ids), device=device)
        slot = lookup[mask.long()]
        index.append((b * per_image + slot * (n_max + 1) + cell_index(*mask.shape, grid, device)).reshape(-1))
    counts = torch.bincount(index[0] if len(index) == 1 else torch.cat(index), minlength=len(masks) * per_image)
    counts = counts.reshape(len(masks), g_max + 1, n_max + 1)[:, :, :n_max].to(WORK)
    per_cell = counts.sum(dim=1)  # every pixel of a cell, labelled or not
    counts = counts[:, :g_max]
    cells = length_mask([h * w for h, w in grids], n_max, device)
    if mode == "soft":
        return counts / per_cell.clamp(min=1.0)[:, None, :], cells
    labelled = counts.sum(dim=1)
    top, winner = counts.max(dim=1)  # the first maximum: the lower class id
    wins = (top >= per_cell - labelled) & (labelled > 0)
    weights = F.one_hot(winner, g_max).transpose(1, 2).to(WORK)
    return weights * wins[:, None, :], cells


def class_centroids(features: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean feature of every class, the features resized to the weights' grid.

    Parameters
    ----------
    features : tensor, shape (B, D, h, w)
        On their own grid (resized to the weights' grid as :func:`~.resize.resize` does, but
        never materialised: the weights are taken back to the features' grid instead).
    weights : tensor, shape (B, G, H, W)

    Returns
    -------
    centroids : tensor, shape (B, G, D)
        Zero for a class with no weight anywhere.
    present : bool tensor, shape (B, G)
        Whether the class had any weight.
    """
    mass = weights.sum(dim=(-2, -1))[..., None]
    present = mass > 0
    pooled = resize_adjoint(weights, features.shape[-2:]).flatten(2) @ features.flatten(2).mT
    return torch.where(present, pooled / mass.clamp(min=1e-12), 0.0), present[..., 0]


def l2_normalise(vectors: torch.Tensor, dim: int, eps: float = 1e-8) -> torch.Tensor:
    """``vectors`` divided by their L2 norm along ``dim`` (zero vectors stay zero)."""
    return vectors / torch.linalg.vector_norm(vectors, dim=dim, keepdim=True).clamp(min=eps)


def cosine_maps(features: torch.Tensor, centroids: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Cosine similarity of every cell of the features resized to ``size`` to every centroid.

    ``features`` is (B, D, h, w), ``centroids`` (B, G, D); returns (B, G, H * W). One matrix
    product of the unit centroids with the features on their grid, resized (it is linear), over
    the resized cells' norms (:func:`~.resize.resized_norms`): 10-100x faster than a broadcast
    ``cosine_similarity`` (docs/performance.md), and a ~1,300-channel WSS layer is read, never
    resized or rewritten.
    """
    batch, _, h, w = features.shape
    dots = (l2_normalise(centroids, -1) @ features.flatten(2)).reshape(batch, -1, h, w)
    return (resize(dots, size) / resized_norms(features, size)[:, None].clamp(min=1e-8)).flatten(2)


def minmax(values: torch.Tensor, dim: int, clip: float = OTParams.minmax_clip, *, valid=None) -> torch.Tensor:
    """Min-max normalise ``values`` along ``dim`` to [0, 1]; the span is clipped at ``clip``.

    The denominator ``max - min`` is clipped (the released code's 1e-5), so a nearly constant
    row maps to nearly 0 rather than being blown up. ``valid`` (broadcastable bool): entries
    that count — padding of a batch never reaches a minimum or a maximum and comes out 0.

    Examples
    --------
    >>> minmax(torch.tensor([[1.0, 3.0, 2.0]]), -1).tolist()
    [[0.0, 1.0, 0.5]]
    """
    if valid is None:
        low, high = values.amin(dim=dim, keepdim=True), values.amax(dim=dim, keepdim=True)
    else:
        low = torch.where(valid, values, torch.inf).amin(dim=dim, keepdim=True)
        high = torch.where(valid, values, -torch.inf).amax(dim=dim, keepdim=True)
    out = (values - low) / (high - low).clamp(min=clip)
    return out if valid is None else torch.where(valid, out, 0.0)


def heat_maps(features, weights, *, clip: float = OTParams.minmax_clip, prototypes=None, weight: float = 0.0):
    """CAP centroids and min-max normalised cosine heat maps of feature maps of one shape.

    Parameters
    ----------
    features : tensor, shape (B, D, h, w)
        On their own grid; every image's map has the grid of ``weights``' cells after a resize.
    weights : tensor, shape (B, G, H, W)
        From :func:`cell_fractions` on the (H, W) grid of Steps 2-3.
    prototypes : tensor, shape (B, G, D), optional
        Class prototypes blended into the centroids with ``weight`` (:func:`blend_centroids`);
        without them, or with ``weight`` 0, the centroids are the image's own (the paper).

    Returns
    -------
    maps : tensor, shape (B, G, H * W), in [0, 1]
        Zero for a class without any weight (no centroid) and no prototype.
    centroids : tensor, shape (B, G, D)
    """
    centroids, present = blended_centroids(features, weights, prototypes, weight)
    maps = minmax(cosine_maps(features, centroids, weights.shape[-2:]), -1, clip)
    return torch.where(present[..., None], maps, 0.0), centroids


def blended_centroids(features, weights, prototypes=None, weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`class_centroids`, blended with ``prototypes`` at ``weight`` when given
    (:func:`blend_centroids`); ``present``: whether a class has a centroid at all."""
    centroids, present = class_centroids(features, weights)
    if prototypes is not None and weight > 0:
        centroids = blend_centroids(centroids, present, prototypes, weight)
        present = centroids.square().sum(dim=-1) > 0
    return centroids, present


def posterior_support(features, weights, real, *, temperature: float, prior: float, prototypes=None, weight: float = 0.0):
    """CAP weights that keep a class's centroid on the cells that look like it (ours, 0.5).

    ``(weights + prior) * P(k | x_n)``: the class's cell fractions (M_init's), plus ``prior``
    so that a cell outside the class's region counts a little where it looks like the class,
    times the class's posterior at the cell, the softmax over the image's classes of the cosines
    of the cell to their (blended) centroids over ``temperature``. The cells of a coarse M_init
    blob that look like a neighbour leave the class's centroid.

    Parameters
    ----------
    features : tensor, shape (B, D, h, w)
        The USS maps, on their own grid.
    weights : tensor, shape (B, G, H, W)
        From :func:`cell_fractions` on the (H, W) grid of Steps 2-3.
    real : bool tensor, shape (B, G)
        The image's class slots (padding takes no posterior).
    temperature : float > 0
        Of the softmax over cosines in [-1, 1]: 0.05 sharpens a cosine gap of 0.1 to e^2.
    prior : float >= 0
    prototypes, weight
        As in :func:`heat_maps`: the centroids the posterior compares with.

    Returns
    -------
    tensor, shape (B, G, H * W)
        Zero on padded class slots; the caller zeroes padded cells.

    Examples
    --------
    Two cells, two classes, the first cell half of each: it goes to the class it looks like.

    >>> features = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]], dtype=torch.float64)
    >>> weights = torch.tensor([[[[0.5, 0.0]], [[0.5, 1.0]]]], dtype=torch.float64)
    >>> w = posterior_support(features, weights, torch.tensor([[True, True]]), temperature=0.05, prior=0.0)
    >>> [round(v, 3) for v in w[0, :, 0].tolist()]
    [0.5, 0.0]
    """
    centroids, _ = blended_centroids(features, weights, prototypes, weight)
    scores = cosine_maps(features, centroids, weights.shape[-2:]) / temperature
    posterior = torch.softmax(torch.where(real[..., None], scores, -torch.inf), dim=1)
    return torch.where(real[..., None], (weights.flatten(2) + prior) * posterior, 0.0)


def blend_centroids(local: torch.Tensor, present: torch.Tensor, prototypes: torch.Tensor, weight: float) -> torch.Tensor:
    """``(1 - weight) * l2(local) + weight * l2(prototype)`` per class: the image's CAP
    centroids blended with dataset-level class prototypes (:mod:`~.prototypes`).

    Parameters
    ----------
    local : tensor, shape (..., G, D)
        The image's CAP centroids (:func:`class_centroids`).
    present : bool tensor, shape (..., G)
        Whether a class had CAP weight in the image; one without takes its prototype alone.
    prototypes : tensor, shape (..., G, D)
        The prototypes of the same classes; a zero row (class never seen) keeps the local one.
    weight : float in [0, 1]

    Returns
    -------
    tensor, shape (..., G, D)
        Directions only matter (heat maps are cosines); a class with neither stays zero.

    Examples
    --------
    >>> local = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    >>> proto = torch.tensor([[0.0, 1.0], [0.0, 3.0]])
    >>> blend_centroids(local, torch.tensor([True, False]), proto, 0.25).tolist()
    [[0.75, 0.25], [0.0, 1.0]]
    """
    unit_local = l2_normalise(local, -1)
    unit_proto = l2_normalise(prototypes, -1)
    has_proto = prototypes.square().sum(dim=-1) > 0
    mixed = (1.0 - weight) * unit_local + weight * unit_proto
    own = torch.where(present[..., None], unit_local, unit_proto)
    return torch.where((present & has_proto)[..., None], mixed, own)


def correlated_groups(centroids: torch.Tensor, counts: list[int], tau: float) -> list[list[list[int]]]:
    """Step 3.1 for a batch: per image, the groups ``{i} + {j > i : ReLU(cos(V_i, V_j)) > tau}``
    with two or more members, as lists of row indices of its centroids.

    Parameters
    ----------
    centroids : tensor, shape (B, G, D)
        The (USS) centroids of each image, padded.
    counts : list of int
        G_b, the real rows of image b.
    tau : float
        tau = 1 gives no group.

    Examples
    --------
    >>> v = torch.tensor([[[1.0, 0.0], [0.99, 0.1], [0.0, 1.0]]])
    >>> correlated_groups(v, [3], 0.8)
    [[[0, 1]]]
    """
    unit = l2_normalise(centroids.to(WORK), -1)
    # Clipped at 1: rounding puts the cosine of parallel centroids just above 1, which would
    # make tau = 1 group them instead of switching WSS balancing off.
    linked = to_host((unit @ unit.mT).clamp(0.0, 1.0) > tau)  # one transfer for the batch
    out = []
    for b, count in enumerate(counts):
        groups = []
        for i in range(count):
            members = [i] + [j for j in range(i + 1, count) if linked[b, i, j]]
            if len(members) > 1:
                groups.append(members)
        out.append(groups)
    return out
