"""Tensors in and out of the stages: uploads may be asynchronous, copies to the host never are."""
import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from dhr_label.core.tensors import WORK, length_mask, pad_stack, to_device, to_host
from dhr_label.params import CRFParams, DHRParams

from .scenes import batch_scenes


class CopyRecorder(TorchFunctionMode):
    """Records every ``Tensor.to`` / ``copy_`` / ``cpu`` call that asks for an asynchronous copy
    towards the host (the destination is the CPU and ``non_blocking`` is set)."""

    def __init__(self):
        super().__init__()
        self.async_to_host = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("to", "copy_", "cpu") and kwargs.get("non_blocking") or (name == "to" and len(args) > 2 and args[2] is True):
            target = kwargs.get("device") or next((a for a in args[1:] if isinstance(a, (str, torch.device))), None)
            if name == "copy_":
                target = args[0].device
            if name == "cpu" or (target is not None and torch.device(target).type == "cpu"):
                self.async_to_host.append(name)
        return func(*args, **kwargs)


def test_a_whole_batch_never_copies_to_the_host_asynchronously(device):
    # On a GPU a non-blocking device-to-host copy may not have landed when the host reads it:
    # masks would be silently wrong and vary from run to run. Any copy towards the CPU asked to
    # be asynchronous is the bug (on the CPU device too: the code does not know where it runs).
    from dhr_label import refine_batch

    cases = batch_scenes(seed=3)[:2]
    params = DHRParams(guard=1.0, crf=CRFParams(backend="torch"))  # the guard reads M_init and the maps
    with CopyRecorder() as recorder:
        states = refine_batch([c["cam"] for c in cases], [c["labels"] for c in cases], [c["image"] for c in cases],
                              bases=[c["base"] for c in cases], uss=[c["uss"] for c in cases], wss=[c["wss"] for c in cases],
                              background=0, params=params, device=device)
    assert recorder.async_to_host == []
    assert all(s.mask is not None for s in states)


def test_the_recorder_sees_an_asynchronous_copy_to_the_host():
    with CopyRecorder() as recorder:
        torch.ones(3).to("cpu", non_blocking=True)
        torch.ones(3).to(device="cpu", non_blocking=True)
    assert recorder.async_to_host == ["to", "to"]


def test_to_device_keeps_a_tensor_that_is_there_and_converts_arrays():
    t = torch.arange(4)
    assert to_device(t, "cpu") is t
    a = np.arange(6, dtype=np.float32).reshape(2, 3)[:, ::2]  # not contiguous
    out = to_device(a, "cpu", WORK)
    assert out.dtype == torch.float64 and out.tolist() == [[0.0, 2.0], [3.0, 5.0]]


def test_to_host_is_a_numpy_copy_of_the_values():
    t = torch.tensor([1.5, 2.5], requires_grad=True)
    out = to_host(t)
    assert isinstance(out, np.ndarray) and out.tolist() == [1.5, 2.5]


def test_pad_stack_and_length_mask():
    out, shapes = pad_stack([np.ones((2, 3)), np.full((1, 4), 2.0)], "cpu")
    assert shapes == [(2, 3), (1, 4)] and out.shape == (2, 2, 4) and out.dtype == WORK
    assert out[0].tolist() == [[1, 1, 1, 0], [1, 1, 1, 0]] and out[1].tolist() == [[2, 2, 2, 2], [0, 0, 0, 0]]
    single, _ = pad_stack([torch.ones(3, 2).T], "cpu")  # a batch of one: a contiguous copy in the work dtype
    assert single.shape == (1, 2, 3) and single.is_contiguous()
    assert length_mask([1, 3], 4, "cpu").tolist() == [[True, False, False, False], [True, True, True, False]]
