"""Access to benchmarks/make_inputs.py, the one generator of synthetic contract files at scale."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def make_inputs():
    """The ``benchmarks/make_inputs.py`` module (benchmarks/ is not a package)."""
    if "make_inputs" not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "benchmarks" / "make_inputs.py"
        spec = importlib.util.spec_from_file_location("make_inputs", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["make_inputs"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules["make_inputs"]
