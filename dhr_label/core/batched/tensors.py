"""Padding many images' arrays into one tensor, and the masks that say what is real."""
from __future__ import annotations

import numpy as np
import torch

#: dtype of the non-CRF maths on the device. float64: a batch pads its images to common sizes,
#: and the reductions of a padded product may round differently with the padding (the kernel
#: a library picks depends on the shapes); at float64 such differences stay ~1e-16, far below
#: the float32 the CRF receives, so an image's mask does not depend on its batch.
WORK = torch.float64


def as_tensor(array, device, dtype=None) -> torch.Tensor:
    """``array`` (numpy or tensor) on ``device`` (and in ``dtype`` when given); no copy if it is
    there already."""
    tensor = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(array))
    return tensor.to(device=device, dtype=dtype or tensor.dtype, non_blocking=True)


def pad_stack(arrays: list, device, *, dtype=WORK) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """Stack arrays (numpy or tensors) of equal rank into one zero-padded tensor, with their shapes."""
    shapes = [tuple(a.shape) for a in arrays]
    size = [len(arrays)] + [max(s[d] for s in shapes) for d in range(len(shapes[0]))]
    out = torch.zeros(size, dtype=dtype, device=device)
    for i, array in enumerate(arrays):
        out[(i, *[slice(0, n) for n in shapes[i]])] = as_tensor(array, device, dtype)
    return out, shapes


def length_mask(lengths: list[int], size: int, device) -> torch.Tensor:
    """``[B, size]`` bool, True on the first ``lengths[b]`` entries of row b."""
    counts = torch.as_tensor(lengths, device=device)
    return torch.arange(size, device=device)[None, :] < counts[:, None]
