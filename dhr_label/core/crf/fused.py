"""The fused mean-field path (``--crf-kernels triton``): a batch's lattices laid out for the
Triton kernels of :mod:`.kernels`, and each iteration as 8 launches.

Layout. A *structure* is one built lattice (:func:`.lattice.build_lattice`) in kernel form:
its entries, barycentric weights, row offsets, blur neighbours, slice indices (int32) and
normalisation. The Gaussian lattice depends only on an image's size, so one structure per
size serves every image of that size; the bilateral lattices are built for consecutive
images of at most :data:`CHUNK_PIXELS` pixels at a time (the build's temporaries, ~1.4 kB a
pixel, stay bounded whatever the batch). An *instance* is a structure applied to some pixels
of the batch, with its own rows in the row buffers: one Gaussian instance per image, one
bilateral instance per chunk. Every structure is concatenated into flat tensors; a table
says where each instance's parts start.

One iteration: splat (all instances, one launch), blur (one launch per direction 0..5: the
Gaussian's three and the bilateral's six, each launch over the instances that have that
direction, ping-ponging between two row buffers), slice + update + softmax (one launch).
The result is the eager path's (:func:`.meanfield.mean_field`) bit for bit: the same float32
operations in the same order (tests/core/crf/test_fused.py, under Triton's interpreter).
"""
from __future__ import annotations

import contextlib
import enum
import importlib.util
from dataclasses import dataclass

import numpy as np
import torch

from ...params import CRFKernels, CRFParams
from .lattice import build_lattice, slice_alpha
from .softmax import SlotLayout, _exp2_table

__all__ = ["CHUNK_PIXELS", "FusedLattices", "TritonStatus", "count_launches", "resolve_kernels", "triton_status"]

#: Pixels per bilateral lattice build (consecutive whole images; an image larger builds alone).
CHUNK_PIXELS = 1 << 21
D_GAUSS, D_BILAT = 2, 5  # feature dimensions: (x, y) and (x, y, r, g, b)
# Elements per program (rows x padded slots) on a GPU. At 1024 elements ptxas (sm_90, Triton
# 3.6 and 3.9, 16 slots) gave the update 156-231 registers a thread: at 512, 96-142 (the splat
# 93-95 with 4 entries in flight, the blur 96-116 at 2048), no spills (benchmarks/kernel_compile.py).
GPU_TILE = {"splat": 512, "blur": 2048, "update": 512}
# Triton's interpreter runs one program at a time, each operation a numpy call on the whole
# block: blocks are large (up to INTERPRETER_TILE elements), and a splat program's rows x
# entries of its longest row stay near INTERPRETER_WORK, with at least INTERPRETER_SPLAT_ROWS
# rows (a long row's entries are a sequential loop anyway; up to that size a step's numpy
# calls cost about the same: 3x faster than smaller blocks at 360 x 480).
INTERPRETER_TILE = 1 << 16
INTERPRETER_WORK = 1 << 17
INTERPRETER_SPLAT_ROWS = 512
UNROLL = 4  # splat entries whose loads are issued together
#: Compile options of every launch: no contraction of a multiply and an add into one rounding
#: (the eager path rounds both), 4 warps a program.
LAUNCH_OPTIONS = {"num_warps": 4, "enable_fp_fusion": False}


class TritonStatus(enum.Enum):
    """Whether the Triton kernels can run on a device type."""

    compiled = "compiled"  # Triton imports and compiles for CUDA tensors
    interpreted = "interpreted"  # TRITON_INTERPRET=1: the kernels run on CPU tensors, slowly
    missing = "missing"  # Triton is not installed


def triton_status() -> TritonStatus:
    """Triton's state in this process (imports the kernels when Triton is installed)."""
    if importlib.util.find_spec("triton") is None:
        return TritonStatus.missing
    from . import kernels

    return TritonStatus.interpreted if kernels.INTERPRETED else TritonStatus.compiled


def resolve_kernels(choice: CRFKernels | str, device) -> CRFKernels:
    """``eager`` or ``triton`` for ``choice`` on ``device``; ``auto`` is triton on CUDA when
    Triton imports, eager elsewhere.

    Raises ValueError when ``triton`` cannot run there: Triton missing, or CPU tensors without
    Triton's interpreter (``TRITON_INTERPRET=1`` in the environment before the start).
    """
    choice = CRFKernels(choice)
    device = torch.device(device)
    if choice is CRFKernels.eager:
        return choice
    if choice is CRFKernels.auto:
        if device.type != "cuda" or importlib.util.find_spec("triton") is None:
            return CRFKernels.eager
        return CRFKernels.triton if triton_status() is TritonStatus.compiled else CRFKernels.eager
    status = triton_status()
    if status is TritonStatus.missing:
        raise ValueError("the triton CRF kernels need Triton (pip install triton; the CUDA build of torch brings it)")
    if device.type == "cuda" and status is TritonStatus.interpreted:
        raise ValueError("the triton CRF kernels on CUDA: TRITON_INTERPRET=1 is set, which runs them on the CPU; unset it")
    if device.type == "cpu" and status is TritonStatus.compiled:
        raise ValueError(
            "the triton CRF kernels on the CPU run under Triton's interpreter only (slow, for checks): "
            "set TRITON_INTERPRET=1 before the start, or use the eager kernels"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"the triton CRF kernels run on CUDA (or the CPU, interpreted), not on {device.type}")
    return choice


#: The index and weight arrays of a structure that the kernels read, concatenated over structures.
ARRAYS = ("entry", "offsets", "schedule", "neighbours", "index", "weight", "norm")


@dataclass
class _Structure:
    """One built lattice in kernel form (index tensors int32, on the lattice's device).

    ``arrays``: ``entry`` [P (d+1)] entries (pixel * (d+1) + vertex) by row, pixel order
    within a row; ``offsets`` [rows + 1] bounds of each row's entries; ``schedule`` [rows]
    rows, longest first (stable); ``neighbours`` [(d+1) 2 rows] blur neighbours per
    direction, interleaved; ``index`` [P (d+1)] row of each pixel's vertices; ``weight``
    [P (d+1)] float32 barycentric weights (pydensecrf's); ``norm`` [P] float32
    ``1 / sqrt(K(1) + 1e-20)``.
    """

    d: int
    n_rows: int  # lattice points + 1 (row 0: the zero row)
    lengths: np.ndarray  # [n_rows] entries of each scheduled row (host: the splat's loop lengths)
    arrays: dict


def _structure(features: torch.Tensor, image_index: torch.Tensor) -> _Structure:
    """Build a lattice (int32 indices) and keep what the kernels read."""
    from .meanfield import _normalisation

    lattice = build_lattice(features, image_index, index_dtype=torch.int32)
    counts = lattice.splat_offsets.diff()
    schedule = torch.argsort(counts, descending=True, stable=True)
    arrays = {"entry": lattice.splat_entry, "offsets": lattice.splat_offsets.to(torch.int32), "schedule": schedule.to(torch.int32),
              "neighbours": lattice.blur_index.reshape(-1), "index": lattice.slice_index.reshape(-1),
              "weight": lattice.slice_weight.reshape(-1), "norm": _normalisation(lattice)}
    return _Structure(lattice.d, lattice.n_points + 1, counts.index_select(0, schedule).cpu().numpy(), arrays)


class FusedLattices:
    """The Gaussian and bilateral lattices of a batch, laid out for the fused kernels.

    Parameters
    ----------
    images : list of Tensor, each (H_b, W_b, 3) uint8, on one device
    params : CRFParams
    chunk_pixels : int, optional
        Pixels per bilateral build (:data:`CHUNK_PIXELS`); any value gives the same result.
    tiling : {"device", "interpreter"}, optional
        Block sizes for a GPU or for Triton's interpreter; default: the interpreter's when it
        runs the kernels. Any tiling gives the same result (benchmarks/gpu_model.py counts
        the device's launches under the interpreter).
    """

    def __init__(self, images: list[torch.Tensor], params: CRFParams, *, chunk_pixels: int | None = None,
                 tiling: str | None = None):
        from . import kernels
        from .meanfield import bilateral_features, gaussian_features

        self.kernels = kernels
        self.tiling = tiling or ("interpreter" if kernels.INTERPRETED else "device")
        if self.tiling not in ("device", "interpreter"):
            raise ValueError(f"tiling must be 'device' or 'interpreter', found {tiling!r}")
        self.device = images[0].device
        sizes = [(int(im.shape[0]), int(im.shape[1])) for im in images]
        starts = np.concatenate([[0], np.cumsum([h * w for h, w in sizes])]).astype(np.int64)
        self.n_pixels = int(starts[-1])
        dev = self.device
        gauss = {}  # size -> structure id
        structures: list[_Structure] = []
        for size in sizes:
            if size not in gauss:
                gauss[size] = len(structures)
                features = gaussian_features(*size, params.gauss_sxy, device=dev)
                structures.append(_structure(features, torch.zeros(size[0] * size[1], dtype=torch.int64, device=dev)))
        chunks = _chunks([h * w for h, w in sizes], chunk_pixels or CHUNK_PIXELS)
        bilat = []
        for first, stop in chunks:
            features = torch.cat([bilateral_features(im, params.bilateral_sxy, params.bilateral_srgb) for im in images[first:stop]])
            counts = torch.tensor([h * w for h, w in sizes[first:stop]], device=dev)
            index = torch.repeat_interleave(torch.arange(stop - first, device=dev), counts)
            bilat.append(len(structures))
            structures.append(_structure(features, index))
        # Instances: a Gaussian one per image (first: the blur's last directions skip them),
        # then a bilateral one per chunk.
        uses = [(gauss[size], int(starts[b])) for b, size in enumerate(sizes)]
        uses += [(s, int(starts[first])) for s, (first, _) in zip(bilat, chunks)]
        self._lay_out(structures, uses)
        chunk_of = [c for c, (first, stop) in enumerate(chunks) for _ in range(first, stop)]
        self._images = [(int(starts[b]), h * w, b, len(sizes) + chunk_of[b]) for b, (h, w) in enumerate(sizes)]
        self.n_gauss_instances = len(sizes)
        self.weights = (-float(np.float32(params.gauss_compat)), -float(np.float32(params.bilateral_compat)))
        #: Lattice points of the Gaussian structures (one per size) and of the bilateral ones.
        self.lattice_points = [sum(s.n_rows - 1 for s in structures[:len(gauss)]), sum(s.n_rows - 1 for s in structures[len(gauss):])]
        self.structures = len(structures)

    def _lay_out(self, structures: list[_Structure], uses: list[tuple[int, int]]) -> None:
        """Concatenate the structures' arrays (each structure's part freed as it is copied);
        the instance table."""
        bases = [{} for _ in structures]
        for name in ARRAYS:
            total = 0
            for base, s in zip(bases, structures):
                base[name] = total
                total += s.arrays[name].numel()
            setattr(self, name, torch.cat([s.arrays.pop(name) for s in structures]))
        rows, table = 0, []
        self._uses = []  # (rows, scheduled row lengths, instance) of every instance
        for i, (sid, pixel) in enumerate(uses):
            s, b = structures[sid], bases[sid]
            # entry, index and weight have the same length per structure: the weights are read
            # by entry (pixel * (d+1) + vertex) and by slice with the one base.
            table.append([pixel, rows, s.n_rows, b["offsets"], b["schedule"], b["entry"], b["norm"], b["neighbours"],
                          b["index"], s.d + 1])
            self._uses.append((s.n_rows, s.lengths, i))
            rows += s.n_rows
        self.n_rows = rows
        self.instance_rows = [n for n, _, _ in self._uses]
        self.instances = torch.tensor(table, dtype=torch.int64, device=self.device)
        self._tables: dict[int, dict] = {}  # block tables per padded slot count (_blocks)

    # ------------------------------------------------------------------------------------------
    def _blocks(self, padded: int) -> dict:
        """Block tables, rows (instance or image, first row or pixel, loop length), int32 on
        the device; made once per padded slot count (numpy, no Python loop over blocks).

        ``splat``: a list of (rows per program, table), one launch each: on a GPU one launch;
        interpreted, the scheduled rows are cut so that rows x loop length stays near
        :data:`INTERPRETER_WORK` (a few long rows per program, many short ones).
        """
        if padded in self._tables:
            return self._tables[padded]
        interpreted = self.tiling == "interpreter"
        tile = {name: INTERPRETER_TILE if interpreted else GPU_TILE[name] for name in GPU_TILE}
        size = {"blur": _block_rows(tile["blur"], padded, max(self.instance_rows), interpreted),
                "update": _block_rows(tile["update"], padded, max(n for _, n, _, _ in self._images), interpreted)}
        splat: dict[int, list] = {}
        gauss_blur, bilat_blur = [], []
        for n_rows, lengths, i in self._uses:
            if interpreted:
                start = 0
                while start < n_rows:
                    rows = _splat_rows(int(lengths[start]), padded, n_rows - start)
                    splat.setdefault(rows, []).append(_table(i, [start], lengths[[start]]))
                    start += rows
            else:
                rows = _block_rows(tile["splat"], padded, n_rows, False)
                starts = np.arange(0, n_rows, rows)
                splat.setdefault(rows, []).append(_table(i, starts, lengths[starts]))
            target = gauss_blur if i < self.n_gauss_instances else bilat_blur
            target.append(_table(i, np.arange(0, n_rows, size["blur"]), 0))
        update = [_table(b, np.arange(0, n, size["update"]), 0) for b, (_, n, _, _) in enumerate(self._images)]

        def upload(parts):
            return torch.from_numpy(np.concatenate(parts)).to(self.device)

        self._tables[padded] = {
            "size": size, "splat": [(rows, upload(parts)) for rows, parts in sorted(splat.items())],
            "blur": upload(gauss_blur + bilat_blur), "bilat_from": sum(len(t) for t in gauss_blur), "update": upload(update)}
        return self._tables[padded]

    def mean_field(self, neg_unary: torch.Tensor, layout: SlotLayout, alpha_last: list[bool], iterations: int) -> torch.Tensor:
        """Mean-field marginals in slot layout (:func:`.meanfield.mean_field`, fused).

        Parameters
        ----------
        neg_unary : Tensor, shape (P, S), float32
            ``-U``, with -inf in the slots an image does not use.
        layout : SlotLayout
        alpha_last : list of bool
            Per image, pydensecrf's slicing path (True for C <= 2 labels).
        iterations : int

        Returns
        -------
        Tensor, shape (P, S), float32
        """
        k = self.kernels
        slots = neg_unary.shape[1]
        padded = _padded(slots)
        blocks = self._blocks(padded)
        images = torch.tensor([[p, n, g, b, int(last)] for (p, n, g, b), last in zip(self._images, alpha_last)],
                              dtype=torch.int64, device=self.device)
        q = torch.empty_like(neg_unary)
        update = dict(S=slots, SP=padded, BLOCK=blocks["size"]["update"], PAIRS=layout.pairs, LAST=int(layout.last),
                      TAIL=layout.tail, D_GAUSS=D_GAUSS, D_BILAT=D_BILAT)
        common = (self.index, self.weight, self.norm, self.instances, images, blocks["update"], _exp2_table(self.device),
                  slice_alpha(D_GAUSS), slice_alpha(D_BILAT), *self.weights)
        _launch(k.update_kernel, blocks["update"], neg_unary, q, q, q, *common, MESSAGES=False, **update)
        if iterations == 0:
            return q
        buffers = (torch.empty(self.n_rows, slots, dtype=torch.float32, device=self.device),
                   torch.empty(self.n_rows, slots, dtype=torch.float32, device=self.device))
        for _ in range(iterations):
            for rows, part in blocks["splat"]:
                _launch(k.splat_kernel, part, q, self.norm, self.entry, self.weight, self.offsets, self.schedule, buffers[0],
                        self.instances, part, slots, SP=padded, BLOCK=rows, UNROLL=UNROLL)
            for j in range(D_BILAT + 1):
                part = blocks["blur"] if j <= D_GAUSS else blocks["blur"][blocks["bilat_from"]:]
                _launch(k.blur_kernel, part, buffers[j % 2], buffers[(j + 1) % 2], self.neighbours, self.instances, part, j,
                        slots, SP=padded, BLOCK=blocks["size"]["blur"])
            # After d+1 directions a lattice's rows are in buffer (d+1) % 2.
            _launch(k.update_kernel, blocks["update"], neg_unary, q, buffers[(D_GAUSS + 1) % 2], buffers[(D_BILAT + 1) % 2],
                    *common, MESSAGES=True, **update)
        return q


def _launch(kernel, blocks: torch.Tensor, *args, **meta) -> None:
    """One program per block, with :data:`LAUNCH_OPTIONS`."""
    if blocks.shape[0]:
        kernel[(blocks.shape[0],)](*args, **meta, **LAUNCH_OPTIONS)


def _table(first: int, starts: np.ndarray, lengths) -> np.ndarray:
    """Block table rows (first, start, length) as int32, one per start."""
    out = np.empty((len(starts), 3), dtype=np.int32)
    out[:, 0], out[:, 1], out[:, 2] = first, starts, lengths
    return out


def _padded(slots: int) -> int:
    """Slots rounded up to a power of two (a block's column count), at least 4."""
    return max(4, 1 << (slots - 1).bit_length())


def _block_rows(tile: int, padded: int, largest: int, interpreted: bool) -> int:
    """Rows (or pixels) per program, a power of two >= 16: ``tile`` elements on a GPU;
    interpreted, up to ``tile`` elements (default :data:`INTERPRETER_TILE`) but no more rows
    than the next power of two of ``largest``."""
    if not interpreted:
        return max(16, tile // padded)
    by_tile = 1 << (max(1, tile // padded).bit_length() - 1)
    return max(16, min(by_tile, 1 << (max(1, largest) - 1).bit_length()))


def _splat_rows(longest: int, padded: int, left: int) -> int:
    """Interpreted splat: rows per program for rows of up to ``longest`` entries, a power of
    two (rows x entries near :data:`INTERPRETER_WORK`, at least :data:`INTERPRETER_SPLAT_ROWS`,
    no more than the next power of two of ``left``)."""
    by_work = max(INTERPRETER_SPLAT_ROWS, INTERPRETER_WORK // max(1, longest))
    return _block_rows(min(by_work * padded, INTERPRETER_TILE), padded, left, True)


def _chunks(counts: list[int], limit: int) -> list[tuple[int, int]]:
    """Consecutive image ranges [first, stop) of at most ``limit`` pixels (at least one image)."""
    chunks, first, total = [], 0, 0
    for b, n in enumerate(counts):
        if b > first and total + n > limit:
            chunks.append((first, b))
            first, total = b, 0
        total += n
    chunks.append((first, len(counts)))
    return chunks


@contextlib.contextmanager
def count_launches():
    """Count the fused kernels' launches in the block: yields a dict (kernel name -> launches).

    Triton's pre-run hooks run at every launch, compiled or interpreted (benchmarks/gpu_model.py).
    """
    from . import kernels

    counts: dict[str, int] = {}
    hooked = []
    for name in ("splat_kernel", "blur_kernel", "update_kernel"):
        kernel = getattr(kernels, name)

        def hook(*args, _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1

        kernel.add_pre_run_hook(hook)
        hooked.append((kernel, hook))
    try:
        yield counts
    finally:
        for kernel, hook in hooked:
            kernel.pre_run_hooks.remove(hook)
