"""Where a benchmark ran: CPU / GPU identity, library versions, the results folder's
machine slug, which backend ``auto`` resolves to, and keeping the source checkout's root
off ``sys.path`` (see :func:`drop_repo_root_from_path`)."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import sys


def drop_repo_root_from_path() -> list[str]:
    """Remove the source checkout's root from ``sys.path``.

    ``python -m`` from the checkout (and pytest's rootdir insertion) put the repository root
    on ``sys.path``; its ``kernels/`` folder then shadows the Hugging Face ``kernels`` package
    that transformers / bitsandbytes probe for, and importing it as a top-level ``kernels``
    registers the ``rlfuse::*`` custom ops a second time (torch then fails with an INTERNAL
    ASSERT). The installed ``rlfuse.*`` packages never need the root on the path.
    """
    removed = []
    for entry in list(sys.path):
        root = os.path.abspath(entry or os.getcwd())
        if (os.path.isfile(os.path.join(root, "kernels", "dispatch.py"))
                and os.path.isfile(os.path.join(root, "benchmarks", "spec.py"))
                and os.path.isfile(os.path.join(root, "setup.py"))):
            sys.path.remove(entry)
            removed.append(entry)
    for name, finder in list(sys.path_importer_cache.items()):
        if name in removed:
            del sys.path_importer_cache[name]
    return removed



def _slug(text: str) -> str:
    text = re.sub(r"\(r\)|\(tm\)|\bcpu\b|\bprocessor\b|@.*$|\d+-core", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:  # noqa: BLE001
        return None


def machine_info(device_type: str = "cpu") -> dict:
    import torch

    info = {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: _version(dist) for name, dist in (
            ("torch", "torch"), ("triton", "triton"), ("transformers", "transformers"),
            ("peft", "peft"), ("trl", "trl"), ("liger_kernel", "liger-kernel"),
            ("rlfuse", "rlfuse"), ("pytest_benchmark", "pytest-benchmark"))},
        "device": device_type,
    }
    info["versions"]["torch"] = torch.__version__
    with contextlib.suppress(Exception):
        import psutil
        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    with contextlib.suppress(OSError, AttributeError):
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
                       "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
                       "count": torch.cuda.device_count()}
    try:
        import rlfuse.kernels as K
        info["backends"] = K.available_backends()
        info["backends_missing"] = K.unavailable_reasons()
    except Exception as exc:  # noqa: BLE001
        info["backends"] = [f"import failed: {exc}"]
    return info


def machine_slug(info: dict) -> str:
    if info.get("device") == "cuda" and info.get("gpu"):
        gpu = info["gpu"]
        n = gpu.get("count", 1)
        return f"gpu-{_slug(gpu['name'])}" + (f"-x{n}" if n > 1 else "")
    return f"cpu-{_slug(info['cpu_model'])}-{info['logical_cores']}c"


def describe_backend(backend: str, device: str) -> str:
    """The backend that ``auto`` resolves to for ``device`` (for the report)."""
    try:
        import torch
        from rlfuse.kernels import dispatch
        if backend == "auto":
            return dispatch.resolve(torch.device(device), "logprobs_forward")
        return backend
    except Exception:  # noqa: BLE001
        return backend


