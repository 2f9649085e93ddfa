"""Suite-wide options (kornia style): ``--device`` for the torch code, ``--runslow`` for slow tests.

``pytest`` alone runs everything on the CPU, so CI (no GPU) passes; ``pytest --device cuda``
runs the device-parametrised tests (those taking the ``device`` fixture) on the GPU as well.
"""
from __future__ import annotations

import os

import pytest


def pytest_addoption(parser):
    parser.addoption(
        "--device", action="append", default=None,
        help="torch device(s) for device-parametrised tests: cpu (default), cuda, cuda:1...; repeat for several",
    )
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config):
    """Triton's interpreter runs the fused CRF kernels on CPU tensors (tests/core/crf/test_fused.py).
    Triton chooses it when the kernels are imported, so it is set here, before any test module
    imports them -- unless a CUDA device is tested, where the kernels are compiled."""
    devices = config.getoption("--device") or ["cpu"]
    if not any(d.startswith("cuda") for d in devices):
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        devices = metafunc.config.getoption("--device") or ["cpu"]
        metafunc.parametrize("device_name", devices, scope="session")


@pytest.fixture(scope="session")
def device(device_name):
    """The torch device of this parametrisation; a CUDA device that is absent fails loudly."""
    torch = pytest.importorskip("torch")
    chosen = torch.device(device_name)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"--device {device_name}: torch sees no CUDA device")
    return chosen


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that reaches pydensecrf on a machine without it (a GPU box: no wheel exists for
    its Python) is reported as skipped, with the reason, not as failed: pydensecrf is the
    reference of many comparisons, and the rest of such a run still says what works there."""
    outcome = yield
    excinfo = call.excinfo
    if excinfo is not None and excinfo.errisinstance(ModuleNotFoundError) and (excinfo.value.name or "").split(".")[0] == "pydensecrf":
        report = outcome.get_result()
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, "Skipped: pydensecrf is not installed here (the reference of this test)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
