"""Reading weight files without running code from them.

Plain state dicts (DINO, DINOv2, EfficientNet-Lite, the DHR release's ``STEGO_<data>.pt``) load
with ``torch.load(weights_only=True)``. STEGO's own checkpoints are PyTorch Lightning files whose
``hyper_parameters`` hold configuration objects (OmegaConf) that ``weights_only`` refuses; those
are read with an unpickler that rebuilds tensors and containers and replaces every other object
by an inert :class:`Opaque` placeholder, so nothing named in the file is imported or called.
"""
from __future__ import annotations

import collections
import pickle
from pathlib import Path

import torch

#: The only globals the fallback unpickler resolves to real objects (tensor rebuilding, containers).
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
}


class Opaque:
    """Stands for an object of a class the checkpoint names but this reader does not trust."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __call__(self, *args, **kwargs):  # a pickled callable (REDUCE) applied to its arguments
        return Opaque(*args)


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        found = _ALLOWED.get((module, name))
        if found is not None:
            return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return Opaque


class _RestrictedPickle:
    """The ``pickle_module`` torch.load uses: :class:`_Unpickler` in place of pickle's."""

    Unpickler = _Unpickler
    __name__ = "dhr_label_restricted_pickle"

    @staticmethod
    def load(file, **kwargs):
        return _Unpickler(file, **kwargs).load()


def load_weights(path: Path) -> dict:
    """The object stored in a weight file, tensors on the CPU.

    Raises
    ------
    ValueError
        The file is not a torch checkpoint (the message says what torch found).
    OSError
        The file cannot be read.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # objects beyond tensors and containers: read them as Opaque placeholders
    except (RuntimeError, KeyError, EOFError, ValueError) as exc:
        raise ValueError(f"not a readable torch checkpoint: {str(exc).splitlines()[0]}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickle)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError, KeyError, ValueError) as exc:
        raise ValueError(f"not a readable torch checkpoint: {str(exc).splitlines()[0]}") from None
