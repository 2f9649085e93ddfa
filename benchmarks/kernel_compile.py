"""Compile the fused CRF kernels for a Hopper GPU (sm_90) here, with no GPU, and read their PTX.

The fused mean-field of a few small generated images is run with the launches recorded
instead of executed (CPU tensors, Triton not interpreted); every distinct specialisation
(kernel, argument types, compile-time constants) is then compiled by Triton for
``GPUTarget("cuda", 90, 32)`` down to a cubin (ptxas included), as the device would at its
first launch. Checked in the PTX, as the bit-exactness of the fused path needs:

* no fused multiply-add (``fma.rn``): ``enable_fp_fusion=False`` reached the compiler;
* divisions correctly rounded (``div.rn.f32``), none approximate (``div.full``, ``div.approx``);
* glibc's round-to-nearest trick ``(r + 1.5 2^52) - 1.5 2^52`` kept (not folded away);
* nothing flushes subnormals to zero (``.ftz``) but the floor in Eigen's exp, whose argument
  is never subnormal.

ptxas's resource report (registers, spills, shared memory) is recorded per kernel.

Usage (the test suite runs it; TRITON_INTERPRET must not be set)::

    python benchmarks/kernel_compile.py --json compile.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROUND_CONSTANT = "0d4338000000000000"  # 1.5 * 2^52 as a PTX double literal

_TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}


def record_launches(labels: tuple[int, ...] = (3, 11), size: tuple[int, int] = (12, 16)) -> list[tuple]:
    """The (kernel, args, meta) of one fused mean-field call (2 iterations) on generated images."""
    from dhr_label.core.crf import fused
    from dhr_label.core.crf.softmax import slot_layout
    from dhr_label.params import CRFParams

    gen = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (*size, 3), dtype=torch.uint8, generator=gen) for _ in labels]
    lattices = fused.FusedLattices(images, CRFParams(), tiling="device")
    layout = slot_layout(list(labels))
    neg = -torch.rand(len(labels) * size[0] * size[1], layout.n_slots, generator=gen)
    launches = []
    original = fused._launch
    fused._launch = lambda kernel, blocks, *args, **meta: launches.append((kernel, args, meta))
    try:
        lattices.mean_field(neg, layout, [c <= 2 for c in labels], 2)
    finally:
        fused._launch = original
    return launches


def specialisation(kernel, args: tuple, meta: dict) -> tuple[dict, dict]:
    """Triton's signature (argument name -> type) and compile-time constants of a launch."""
    names = kernel.arg_names
    constexprs = {p.name for p in kernel.params if p.is_constexpr}
    values = dict(zip(names, args)) | {k: v for k, v in meta.items() if k in names}
    signature, constants = {}, {}
    for name in names:
        value = values[name]
        if name in constexprs:
            signature[name], constants[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        else:
            signature[name] = "fp32"
    return signature, constants


def ptxas_report(ptx: str) -> dict:
    """Registers, spill bytes and shared memory that ptxas reports for ``ptx`` (its target,
    sm_90a for Triton's Hopper builds)."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path  # the one Triton compiles with (it changed between releases)
    arch = m.group(1) if (m := re.search(r"^\.target\s+(sm_\w+)", ptx, re.M)) else "sm_90"
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "k.ptx"
        source.write_text(ptx)
        done = subprocess.run([str(ptxas), "--gpu-name", arch, "-v", str(source), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True, check=False)
    text = done.stdout + done.stderr
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, text)) else None  # noqa: E731
    return {"registers": number(r"Used (\d+) registers"), "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads"), "shared": number(r"(\d+) bytes smem"), "ptxas_rc": done.returncode}


def compile_all(launches: list[tuple]) -> list[dict]:
    """Compile every distinct specialisation for sm_90; check and report each."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dhr_label.core.crf.fused import LAUNCH_OPTIONS

    seen, rows = set(), []
    for kernel, args, meta in launches:
        signature, constants = specialisation(kernel, args, meta)
        key = (kernel.fn.__name__, tuple(sorted(signature.items())), tuple(sorted(constants.items())))
        if key in seen:
            continue
        seen.add(key)
        start = time.perf_counter()
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                                  target=GPUTarget("cuda", 90, 32),
                                  options=dict(LAUNCH_OPTIONS))
        ptx = compiled.asm["ptx"]
        row = {
            "kernel": kernel.fn.__name__, "constants": {k: v for k, v in constants.items()}, "seconds": time.perf_counter() - start,
            "cubin_bytes": len(compiled.asm["cubin"]), "fma": len(re.findall(r"\bfma\.rn", ptx)),
            "div_rn_f32": len(re.findall(r"\bdiv\.rn\.f32", ptx)), "div_approx": len(re.findall(r"\bdiv\.(full|approx)", ptx)),
            "round_constant": ptx.count(ROUND_CONSTANT), "ftz": sorted(set(re.findall(r"\b[a-z]+(?:\.[a-z0-9]+)*\.ftz[a-z0-9.]*", ptx))),
            **ptxas_report(ptx),
        }
        # Flushing subnormals would change results; the one flushing instruction allowed is the
        # floor of Eigen's exp, whose argument (v log2(e) + 0.5, v in [-88.4, 88.4]) is a
        # multiple of 2^-25 and so never subnormal.
        row["ok"] = row["fma"] == 0 and row["div_approx"] == 0 and row["ptxas_rc"] == 0 and set(row["ftz"]) <= {
            "cvt.rmi.ftz.f32.f32"} and (
            row["kernel"] != "update_kernel" or (row["div_rn_f32"] > 0 and row["round_constant"] >= 2))
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the report to this JSON file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the kernels that are to be compiled")
    import triton

    torch.set_num_threads(1)
    rows = compile_all(record_launches())
    report = {"triton": triton.__version__, "target": "cuda sm_90", "kernels": rows, "ok": all(r["ok"] for r in rows)}
    for r in rows:
        print(f"{r['kernel']:14s} {json.dumps(r['constants'])[:70]:70s} regs {r['registers']} spills {r['spill_stores']}/"
              f"{r['spill_loads']} fma {r['fma']} div.rn {r['div_rn_f32']} approx {r['div_approx']} {r['seconds']:.1f}s "
              f"{'ok' if r['ok'] else 'FAILED'}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
