"""Backend choice for every op, in one place.

A backend is a module exposing the functions listed in ``kernels/backends/__init__.py``.
``auto`` picks the fastest backend present for the tensor's device: cuda → triton → torch
for CUDA tensors, cpp → torch for CPU tensors. ``use_backend("name")`` or the environment
variable ``RLFUSE_BACKEND`` force one; forcing one that is not available raises.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from types import ModuleType

import torch

_MODULES = {
    "torch": "rlfuse.kernels.backends.torch_backend",
    "cpp": "rlfuse.kernels.backends.cpp",
    "triton": "rlfuse.kernels.backends.triton",
    "cuda": "rlfuse.kernels.backends.cuda",
}
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}
_state = threading.local()
_loaded: dict[str, ModuleType | None] = {}
_load_errors: dict[str, str] = {}


@torch.compiler.assume_constant_result
def _load_all_outside_graph() -> bool:
    """Import every backend once. Under torch.compile this runs eagerly at trace time (dynamo
    cannot trace ``importlib``), so an op first called inside a compiled graph does not break it."""
    for name in _MODULES:
        _import(name)
    return True


def _load(name: str) -> ModuleType | None:
    if torch.compiler.is_compiling():  # before dynamo first reads ``_loaded``
        _load_all_outside_graph()
    return _import(name)


def _import(name: str) -> ModuleType | None:
    if name not in _loaded:
        try:
            module = importlib.import_module(_MODULES[name])
            ok = getattr(module, "AVAILABLE", True)
            if not ok:
                _load_errors[name] = getattr(module, "UNAVAILABLE_REASON", "not available")
            _loaded[name] = module if ok else None
        except Exception as exc:  # noqa: BLE001 - a broken optional backend must not break import
            _load_errors[name] = f"{type(exc).__name__}: {exc}"
            _loaded[name] = None
    return _loaded[name]


def available_backends() -> list[str]:
    """Names of the backends that imported and can run here (always includes ``"torch"``)."""
    return [name for name in _MODULES if _load(name) is not None]


def unavailable_reasons() -> dict[str, str]:
    """Why each missing backend is missing (import error or missing hardware)."""
    available_backends()
    return dict(_load_errors)


def current_backend() -> str:
    """The requested backend name: the innermost ``use_backend``, else $RLFUSE_BACKEND, else auto."""
    forced = getattr(_state, "stack", None)
    if forced:
        return forced[-1]
    return os.environ.get("RLFUSE_BACKEND", "auto").strip().lower() or "auto"


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops in this block on backend ``name`` ("auto", "torch", "cpp", "triton", "cuda")."""
    name = name.strip().lower()
    if name != "auto" and name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; choose from {['auto', *_MODULES]}")
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def resolve(device: torch.device, op: str | None = None) -> str:
    """Backend name to run ``op`` on tensors of ``device`` (checked to be usable there)."""
    requested = current_backend()
    kind = "cuda" if device.type == "cuda" else "cpu"
    if requested == "auto":
        for name in _AUTO_ORDER.get(kind, ("torch",)):
            module = _load(name)
            if module is not None and (op is None or _supports(module, op, kind)):
                return name
        return "torch"
    if requested not in _MODULES:
        raise ValueError(f"unknown backend {requested!r} (from RLFUSE_BACKEND or use_backend); "
                         f"choose from {['auto', *_MODULES]}")
    module = _load(requested)
    if module is None:
        raise RuntimeError(f"backend {requested!r} is not available: {_load_errors.get(requested)}")
    if not _supports(module, op, kind):
        raise RuntimeError(f"backend {requested!r} cannot run {op or 'ops'} on {kind} tensors")
    return requested


def _supports(module: ModuleType, op: str | None, kind: str) -> bool:
    devices = getattr(module, "DEVICES", ("cpu", "cuda"))
    return kind in devices and (op is None or hasattr(module, op))


def get(name: str) -> ModuleType:
    """The backend module called ``name`` (must be available)."""
    module = _load(name)
    if module is None:
        raise RuntimeError(f"backend {name!r} is not available: {_load_errors.get(name)}")
    return module
