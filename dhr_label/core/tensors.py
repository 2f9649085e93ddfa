"""Tensors in and out of the stage maths: uploads, host copies, padding many images into one.

Every stage of :mod:`dhr_label.core` is torch code over a batch (a batch of one in a CPU
worker). The arrays it makes follow the device of its inputs and the dtype :data:`WORK`.
"""
from __future__ import annotations

import numpy as np
import torch

#: dtype of the non-CRF maths. float64: a batch pads its images to common sizes, and the
#: reductions of a padded product may round differently with the padding (the kernel a library
#: picks depends on the shapes); at float64 such differences stay ~1e-16, far below the float32
#: the CRF receives, so an image's mask does not depend on its batch, nor on the device.
WORK = torch.float64


def to_device(array, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``array`` (numpy or tensor) on ``device``, in ``dtype`` when given; no copy if it is there.

    Only an upload (host to a CUDA device) is asynchronous (``non_blocking``): the device's
    stream orders it before the kernels that read it. Copies towards the host are made by
    :func:`to_host`, which waits for them.
    """
    tensor = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(array))
    device = torch.device(device)
    upload = tensor.device.type == "cpu" and device.type != "cpu"
    return tensor.to(device=device, dtype=dtype or tensor.dtype, non_blocking=upload)


def to_host(tensor: torch.Tensor) -> np.ndarray:
    """A numpy array of ``tensor``, copied from its device and waited for (never asynchronous:
    a non-blocking device-to-host copy may not have landed when the host reads it)."""
    return tensor.detach().to("cpu").numpy()


def pad_stack(arrays: list, device, *, dtype: torch.dtype = WORK) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """Arrays (numpy or tensors) of equal rank stacked into one zero-padded tensor, with their shapes."""
    shapes = [tuple(a.shape) for a in arrays]
    if len(arrays) == 1:  # a batch of one (a CPU worker): nothing to pad
        return to_device(arrays[0], device, dtype).contiguous()[None], shapes
    size = [len(arrays)] + [max(s[d] for s in shapes) for d in range(len(shapes[0]))]
    out = torch.zeros(size, dtype=dtype, device=device)
    for i, array in enumerate(arrays):
        out[(i, *[slice(0, n) for n in shapes[i]])] = to_device(array, device, dtype)
    return out, shapes


def length_mask(lengths: list[int], size: int, device) -> torch.Tensor:
    """``[B, size]`` bool, True on the first ``lengths[b]`` entries of row b."""
    counts = torch.as_tensor(lengths, device=device)
    return torch.arange(size, device=device)[None, :] < counts[:, None]
