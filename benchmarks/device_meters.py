"""Instruments of benchmarks/gpu_model.py: what the torch CRF would cost a GPU, read off a CPU run.

:class:`OpMeter` (a ``TorchDispatchMode``) counts torch ops that would be kernel launches, the
bytes they read and write, host syncs, and follows allocations to their release (peak memory);
:func:`triton_meter` counts what every Triton launch loads and stores, under Triton's
interpreter (``TRITON_INTERPRET=1`` before the kernels are imported).
"""
from __future__ import annotations

import contextlib
import gc
import weakref
from collections import Counter

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

SYNC_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.unique_consecutive", "aten._unique2", "aten.unique_dim",
            "aten.masked_select", "aten.repeat_interleave.Tensor"}
GATHERS = {"aten.index_select", "aten.embedding_bag", "aten._embedding_bag", "aten.index", "aten.gather"}



#: Set at every Triton launch (a pre-run hook while a meter runs), cleared by the next torch op.
_LAUNCHED = [False]


def _interpreter_artifact(name: str, args) -> bool:
    """Ops Triton's interpreter runs around a launch (host copies of the arguments, copied back
    onto themselves on the CPU), which a GPU launch does not."""
    if name in ("aten.set_", "aten.new_empty") or (name == "aten.empty" and 0 in list(args[0])):
        return True
    return name == "aten.copy_" and args[0].untyped_storage().data_ptr() == args[1].untyped_storage().data_ptr()


def _bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


class OpMeter(TorchDispatchMode):
    """Launches, bytes and host syncs of the torch ops run inside it, and the peak of live
    allocations made inside it (bytes)."""

    def __init__(self):
        super().__init__()
        self.launches = self.read = self.written = self.syncs = 0
        self.ops: Counter = Counter()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = f"aten.{func.overloadpacket.__name__}"
        overload = f"{name}.{func._overloadname}"
        artifact = _interpreter_artifact(name, args)
        if _LAUNCHED[0] and not artifact:  # the interpreter leaves reference cycles: free what a GPU run frees
            _LAUNCHED[0] = False
            gc.collect()
        out = func(*args, **kwargs)
        if not func.is_view and not artifact:
            outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            self.launches += 1
            self.ops[name] += 1
            written = sum(_bytes(t) for t in outputs)
            if name in GATHERS:  # the table is read where gathered: as many bytes as come out
                table = inputs[0]
                read = written + sum(_bytes(t) for t in inputs[1:])
                if name in ("aten.embedding_bag", "aten._embedding_bag"):
                    read = _bytes(inputs[1]) * table.shape[1] * table.element_size() // inputs[1].element_size() + _bytes(inputs[1])
            else:
                read = sum(_bytes(t) for t in inputs)
            self.read += read
            self.written += written
            if name in SYNC_OPS or overload in SYNC_OPS or (name == "aten._to_copy" and kwargs.get("device") == torch.device("cpu")):
                self.syncs += 1
        # A storage is new if the op made it: not a view, nor an input's (in place, out=).
        given = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not func.is_view and t.untyped_storage().data_ptr() not in given:
                self._track(t)
        return out

    def __enter__(self):
        self._hooks = _launch_hooks()
        # Reading tensors back to the host (tolist, numpy) is no torch op on CPU tensors, and a
        # blocking copy on CUDA: counted as host syncs here.
        self._methods = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy", "item")}
        for name, method in self._methods.items():
            setattr(torch.Tensor, name, self._counting(method))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self._methods.items():
            setattr(torch.Tensor, name, method)
        for kernel, hook in self._hooks:
            kernel.pre_run_hooks.remove(hook)
        return super().__exit__(*exc)

    def _counting(self, method):
        def counted(tensor, *args, **kwargs):
            self.syncs += 1
            return method(tensor, *args, **kwargs)

        return counted

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self.live:
            return
        self.live[key] = storage.nbytes()
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def figures(self) -> dict:
        return {"launches": self.launches, "bytes": self.read + self.written, "read": self.read, "written": self.written,
                "syncs": self.syncs, "ops": dict(self.ops.most_common())}


def _launch_hooks() -> list:
    """Pre-run hooks on the fused kernels that mark a launch (for :class:`OpMeter`)."""
    from dhr_label.core.crf import kernels

    hooks = []
    for name in ("splat_kernel", "blur_kernel", "update_kernel"):
        def hook(*args, **kwargs):
            _LAUNCHED[0] = True

        getattr(kernels, name).add_pre_run_hook(hook)
        hooks.append((getattr(kernels, name), hook))
    return hooks


@contextlib.contextmanager
def triton_meter():
    """Per Triton launch (in order): kernel, requested bytes, unique bytes (4-byte words once per
    launch), from the interpreter's loads and stores."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    launches: list[dict] = []
    words: list[np.ndarray] = []

    def close():
        if launches and words:
            launches[-1]["unique"] = 4 * len(np.unique(np.concatenate(words)))
        words.clear()

    def access(ptrs, mask, itemsize):
        chosen = ptrs.data[mask.data] if mask.data.shape == ptrs.data.shape else ptrs.data
        launches[-1]["requested"] += int(chosen.size) * itemsize
        words.append(np.unique(chosen.astype(np.uint64) >> np.uint64(2)))

    load, store = builder.create_masked_load, builder.create_masked_store

    def counted_load(self, ptrs, mask, other, *rest):
        access(ptrs, mask, np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize)
        return load(self, ptrs, mask, other, *rest)

    def counted_store(self, ptrs, value, mask, *rest):
        access(ptrs, mask, value.data.dtype.itemsize)
        return store(self, ptrs, value, mask, *rest)

    hooks = []
    from dhr_label.core.crf import kernels

    for name in ("splat_kernel", "blur_kernel", "update_kernel"):
        def hook(*args, _name=name, **kw):
            close()
            launches.append({"kernel": _name, "requested": 0, "unique": 0})

        getattr(kernels, name).add_pre_run_hook(hook)
        hooks.append((getattr(kernels, name), hook))
    builder.create_masked_load, builder.create_masked_store = counted_load, counted_store
    try:
        yield launches
    finally:
        close()
        builder.create_masked_load, builder.create_masked_store = load, store
        for kernel, hook in hooks:
            kernel.pre_run_hooks.remove(hook)
