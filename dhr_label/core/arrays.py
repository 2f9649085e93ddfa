"""The few spellings where numpy and torch differ, so that a leaf operation is written once.

The numpy core (one image) and the torch batches (many images, any device) share their leaf
operations — min-max, L2 normalisation, CAP centroids, cosine maps — written against the
functions below, which dispatch on the array's type (POT's backend idea, kept to what
dhr-label needs). torch is never imported here: a tensor can only arrive if its caller
imported torch, so the numpy path never pays for it.
"""
from __future__ import annotations

import sys

import numpy as np


def is_tensor(values) -> bool:
    """Whether ``values`` is a torch tensor (False whenever torch was never imported)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(values, torch.Tensor)


def amax(values, axis: int):
    """Maximum along ``axis``, kept as a size-1 axis."""
    return values.amax(dim=axis, keepdim=True) if is_tensor(values) else values.max(axis=axis, keepdims=True)


def amin(values, axis: int):
    """Minimum along ``axis``, kept as a size-1 axis."""
    return values.amin(dim=axis, keepdim=True) if is_tensor(values) else values.min(axis=axis, keepdims=True)


def total(values, axis: int):
    """Sum along ``axis``, kept as a size-1 axis."""
    return values.sum(dim=axis, keepdim=True) if is_tensor(values) else values.sum(axis=axis, keepdims=True)


def at_least(values, low: float):
    """``max(values, low)`` elementwise."""
    return values.clamp(min=low) if is_tensor(values) else np.maximum(values, low)


def sqrt(values):
    return values.sqrt() if is_tensor(values) else np.sqrt(values)


def where(condition, chosen, other):
    """``chosen`` where ``condition`` holds, else ``other`` (scalars allowed for either)."""
    if is_tensor(condition):
        return sys.modules["torch"].where(condition, chosen, other)
    return np.where(condition, chosen, other)


def as_float32(values):
    """float32 of the same kind (a no-op when already float32)."""
    if is_tensor(values):
        return values.float()
    return values.astype(np.float32)
