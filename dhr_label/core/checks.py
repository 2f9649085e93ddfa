"""What DHR requires of one image's arrays, checked before any work: the rules the command line
applies to its files (:mod:`dhr_label.io.contract`, :mod:`dhr_label.io.inputs`), for callers of
the Python API who hand over arrays themselves.

Pure and array-agnostic: numpy arrays or torch tensors on any device are read through their
``shape`` and ``dtype`` (a tensor's ``dtype`` prints as ``torch.float32``), and only the tags and
the CAMs' values are looked at. The file layer words its per-image errors with the same
:func:`tags_problem` and :func:`grid_problem`, so both sides refuse the same inputs alike.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence

from ..params import DHRParams

#: Largest class id + 1 a mask can hold: masks are uint8 and 255 means ignore.
MASK_CLASSES = 255
_FLOATS = ("float16", "bfloat16", "float32", "float64")
_INTEGERS = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64")


def tags_problem(tags: Sequence[int], *, channels: int, num_classes: int, background: int | None) -> str | None:
    """What is wrong with an image's tags, or None: one per CAM channel, class ids in
    ``[0, num_classes)``, unique and ascending, without the background class."""
    tags = [int(t) for t in tags]
    if len(tags) != channels:
        return f"expected {channels} tags (one per cam channel), found {len(tags)}"
    if min(tags) < 0 or max(tags) >= num_classes:
        return f"expected class ids in [0, {num_classes}), found {tags}"
    if any(b <= a for a, b in zip(tags, tags[1:])):
        return f"expected unique ascending tags, found {tags}"
    if background is not None and background in tags:
        return f"tags must not include the background id {background}, found {tags}"
    return None


def grid_problem(grid: tuple[int, int], size: tuple[int, int]) -> str | None:
    """Whether an ``h x w`` map fits an ``H x W`` image: either side within one cell of the
    other's ratio (the rounding of a strided network); what is wrong, or None."""
    h, w = grid
    height, width = size
    if abs(h - height * w / width) <= 1.0 + 1e-6 or abs(w - width * h / height) <= 1.0 + 1e-6:
        return None
    return (f"a {h} x {w} map does not fit the aspect ratio of the {height} x {width} image "
            f"(expected h/w = {height / width:.3f} within one cell)")


def prototypes_problem(prototypes, dims: list[int]) -> str | None:
    """Whether class prototypes were pooled from features like these (``dims``: of the USS
    features, then of each WSS layer; WSS compared only where both have layers); what is wrong, or None."""
    have = [prototypes.uss.shape[1]] + [layer.shape[1] for layer in prototypes.wss]
    if dims[:1] != have[:1] or (prototypes.wss and len(dims) > 1 and dims[1:] != have[1:]):
        return (f"the prototypes have dimensions {have} (USS, WSS layers), this image's features {dims}: "
                "they were pooled from other features")
    return None


def check_image_inputs(
    cam,
    labels,
    *,
    image,
    base=None,
    uss=None,
    wss=None,
    background: int | None,
    params: DHRParams,
    prototypes=None,
    where: str = "",
) -> None:
    """Raise a ValueError naming the argument, expected vs found, for inputs the command line
    would refuse: what :func:`dhr_label.refine_image` and :func:`dhr_label.refine_batch` check first.

    Parameters
    ----------
    cam : array or tensor, shape (K, h, w), float, finite
    labels : array, tensor or list, shape (K,)
        Integer class ids, unique, ascending, without ``background``.
    image : array or tensor, shape (H, W, 3), uint8
    base : array or tensor, shape (H, W), uint8, optional
    uss : array or tensor, shape (D, h_u, w_u), float, optional
        Required when ``params.steps`` runs Step 2.
    wss : list of array or tensor, each (D_l, h_l, w_l), float, optional
        Required when ``params.steps`` runs Step 3.
    background : int or None
        The dataset's background class id; None for a dataset without one (CamVid, Cityscapes).
    params : DHRParams
    prototypes : Prototypes, optional
        Their classes must cover the tags and the background, their dimensions the features'.
    where : str
        Prefix of every message (e.g. ``"image 3: "`` in a batch).
    """

    def fail(name: str, problem: str):
        return ValueError(f"{where}{name}: {problem}")

    height, width, rgb = _shape(image, "image", "[H, W, 3]", where)
    if rgb != 3 or _dtype(image) != "uint8":
        raise fail("image", f"expected an RGB image [H, W, 3] of uint8, found {_dtype(image)} {list(image.shape)}")
    size = (height, width)
    channels, *grid = _shape(cam, "cam", "[K, h, w]", where)
    if _dtype(cam) not in _FLOATS:
        raise fail("cam", f"expected float CAMs, found {_dtype(cam)}")
    if not bool(((cam - cam) == 0).all()):  # x - x is 0 exactly when x is finite (numpy and torch alike)
        raise fail("cam", "expected finite values, found NaN or Inf")
    if (problem := grid_problem(tuple(grid), size)) is not None:
        raise fail("cam", problem)
    num_classes = prototypes.num_classes if prototypes is not None and params.uses_prototypes else MASK_CLASSES
    if background is not None and not 0 <= background < num_classes:
        raise fail("background", f"expected None or a class id in [0, {num_classes}), found {background}")
    problem = tags_problem(_tags(labels, where), channels=channels, num_classes=num_classes, background=background)
    if problem is not None:
        hint = (" (background= is the dataset's background class; a dataset without one, such as CamVid, takes "
                "background=None)") if "background" in problem else ""
        raise fail("labels", problem + hint)
    if base is not None and (_dtype(base) != "uint8" or _shape(base, "base", "[H, W]", where) != size):
        raise fail("base", f"expected uint8 class ids [H, W] = {list(size)} (the image's size; 255 = ignore), "
                           f"found {_dtype(base)} {list(base.shape)}")
    if params.steps.needs_base and base is None:
        raise fail("base", "Table 6 row 1 outputs the base mask, and none was given")
    dims = []  # of the USS features, then of each WSS layer
    for name, layer, needed in [("uss", uss, params.steps.needs_uss)] + _layers(wss, params.steps.needs_wss, where):
        if layer is None:
            if needed:
                raise fail(name, "expected USS features [D, h, w] (Step 2 is switched on), found None" if name == "uss"
                           else "expected WSS layers, each [D_l, h_l, w_l] (Step 3 is switched on), found None")
            continue
        d, *grid = _shape(layer, name, "[D, h, w]", where)
        if _dtype(layer) not in _FLOATS:
            raise fail(name, f"expected float features, found {_dtype(layer)}")
        if (problem := grid_problem(tuple(grid), size)) is not None:
            raise fail(name, problem)
        dims.append(d)
    if prototypes is not None and params.uses_prototypes and (problem := prototypes_problem(prototypes, dims)) is not None:
        raise fail("prototypes", problem)


def check_batch_inputs(cams: list, labels: list, images: list, *, bases=None, uss=None, wss=None,
                       background: int | None, params: DHRParams, prototypes=None) -> None:
    """:func:`check_image_inputs` for every image of a batch (lists, one entry per image)."""
    n = len(cams)
    for name, values in (("labels", labels), ("images", images), ("bases", bases), ("uss", uss), ("wss", wss)):
        if values is not None and len(values) != n:
            raise ValueError(f"{name}: expected one entry per image ({n}), found {len(values)}")
    for b in range(n):
        check_image_inputs(
            cams[b], labels[b], image=images[b], base=None if bases is None else bases[b], uss=None if uss is None else uss[b],
            wss=None if wss is None else wss[b], background=background, params=params, prototypes=prototypes,
            where=f"image {b}: ",
        )


def _dtype(values) -> str:
    """``float32``, ``uint8``...: a numpy dtype's name, a torch dtype's without ``torch.``."""
    return str(getattr(values, "dtype", type(values).__name__)).removeprefix("torch.")


def _shape(values, name: str, layout: str, where: str) -> tuple[int, ...]:
    """The shape of an array laid out as ``layout`` (``"[K, h, w]"``), every size >= 1."""
    shape = tuple(getattr(values, "shape", ()))
    if not hasattr(values, "shape") or len(shape) != layout.count(",") + 1 or min(shape) < 1:
        found = list(shape) if hasattr(values, "shape") else type(values).__name__
        raise ValueError(f"{where}{name}: expected an array {layout} with every size >= 1, found {found}")
    return shape


def _tags(labels, where: str) -> list[int]:
    """The tags as Python ints: a 1-D integer array or tensor, or a list of integers."""
    if isinstance(labels, (list, tuple)):
        values, integral = list(labels), all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in labels)
    elif hasattr(labels, "tolist") and len(getattr(labels, "shape", ())) == 1:
        values, integral = labels.tolist(), _dtype(labels) in _INTEGERS
    else:
        values, integral = labels, False
    if not integral or not values:
        raise ValueError(f"{where}labels: expected [K] integer class ids (K >= 1), found {_dtype(labels)} {values!r}")
    return [int(v) for v in values]


def _layers(wss, needed: bool, where: str) -> list[tuple[str, object, bool]]:
    """``(name, layer, needed)`` of every WSS layer; one None entry when there are none."""
    if wss is None or (isinstance(wss, (list, tuple)) and not wss):
        return [("wss", None, needed)]
    if not isinstance(wss, (list, tuple)):
        raise ValueError(f"{where}wss: expected a list of feature maps [D_l, h_l, w_l], found {type(wss).__name__}")
    return [(f"wss[{i}]", layer, True) for i, layer in enumerate(wss)]
