"""Test configuration shared by every test file.

* Runs Triton kernels in Triton's CPU interpreter when there is no GPU: ``TRITON_INTERPRET``
  must be set before anything imports triton, so it is set here, at import time.
* The ``backend`` fixture parametrises a test over every backend that can run here (see
  ``backend_cases``); a test using it runs its public-API calls inside ``use_backend(name)``,
  on tensors of ``backend.device``. Backends that are absent (not installed, not built yet,
  no GPU) appear as skipped cases with the reason, never as failures.
* ``RLFUSE_CPU_BF16=0``: ``model.dtype: auto`` is float32 on every CPU here (see below).
"""

from __future__ import annotations

import os

import torch  # noqa: E402  (does not import triton)

if not torch.cuda.is_available():  # on a GPU, test the compiled kernels instead
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

# model.dtype=auto is bf16 on CPUs with native bf16 dot products and float32 on others; the suite
# (and the processes it starts) takes float32 on every CPU so that its results do not depend on
# the machine. Tests of bf16 set model.dtype=bfloat16; tests of the choice itself
# (tests/engine/test_bf16.py) clear this and fake the CPU's flags.
os.environ.setdefault("RLFUSE_CPU_BF16", "0")

import importlib.util  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # so test files can `import helpers`

import rlfuse.kernels as K  # noqa: E402
from rlfuse.kernels import dispatch  # noqa: E402

from helpers import BackendCase  # noqa: E402

ALL_BACKENDS = ("torch", "cpp", "triton", "cuda")


def _backend_params():
    """pytest params for (backend, device): torch and cpp on CPU, triton on CUDA when there is a
    GPU else in the CPU interpreter, cuda on CUDA; torch also on CUDA when there is a GPU."""
    cuda = torch.cuda.is_available()
    available = set(K.available_backends())
    reasons = K.unavailable_reasons()
    params = []

    def add(name, device, slow=False, skip=None):
        case = BackendCase(name, torch.device(device), slow)
        marks = [pytest.mark.skip(reason=skip)] if skip else []
        params.append(pytest.param(case, id=case.id, marks=marks))

    for name in ALL_BACKENDS:
        skip = None
        if name == "triton" and importlib.util.find_spec("triton") is None:
            skip = "triton is not installed"
        elif name not in available:
            skip = f"backend {name!r} not available: {reasons.get(name, 'unknown')}"
        if name == "torch":
            add(name, "cpu")
            if cuda:
                add(name, "cuda")
        elif name == "cpp":
            add(name, "cpu", skip=skip)
        elif name == "triton":
            if cuda:
                add(name, "cuda", skip=skip)
            else:
                if skip is None and "cpu" not in getattr(dispatch.get(name), "DEVICES", ()):
                    skip = "triton backend does not accept CPU tensors (TRITON_INTERPRET not honoured?)"
                add(name, "cpu", slow=True, skip=skip)
        elif name == "cuda":
            add(name, "cuda", skip=skip or (None if cuda else "no CUDA device"))
    return params


BACKEND_PARAMS = _backend_params()


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", BACKEND_PARAMS, indirect=True)


@pytest.fixture
def backend(request):
    """The BackendCase under test; the test body runs inside ``K.use_backend(case.name)``."""
    case: BackendCase = request.param
    with K.use_backend(case.name):
        yield case


@pytest.fixture(autouse=True)
def _clean_env(request, monkeypatch):
    """The public-API suite (test_ops_*) must not inherit a forced backend or a disabled label
    check from the shell."""
    if os.path.basename(str(request.node.fspath)).startswith("test_ops_"):
        monkeypatch.delenv("RLFUSE_BACKEND", raising=False)
        monkeypatch.delenv("RLFUSE_CHECK_LABELS", raising=False)
