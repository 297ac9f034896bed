"""The Triton backend: GPU kernels written in Triton (``rlfuse.kernels.triton``).

Runs on CUDA tensors. With ``TRITON_INTERPRET=1`` it also accepts CPU tensors and runs the
same kernels in Triton's CPU interpreter (slow; that is how the tests exercise it).

``AVAILABLE``, ``UNAVAILABLE_REASON`` and ``DEVICES`` are computed when read (PEP 562
module ``__getattr__``), not frozen at import, so setting ``TRITON_INTERPRET`` after this
module was first imported still takes effect. The kernel modules are imported on first
call for the same reason: ``@triton.jit`` picks interpreted vs compiled at decoration time.
(The dispatcher caches "not available" on its first look; a process that flips
``TRITON_INTERPRET`` late must also forget that entry, as the tests do.)
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

__all__ = ["logprobs_forward", "logprobs_backward", "gae", "ppo_loss_forward"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _status() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'rlfuse[triton]')"
    try:
        importlib.import_module("triton.language")
    except Exception as exc:  # noqa: BLE001 - a broken triton install makes the backend unavailable
        return False, f"triton failed to import: {type(exc).__name__}: {exc}"
    if _interpreting():
        import triton.language as tl
        if type(tl.sum).__name__ == "JITFunction":  # triton's own @jit helpers were compiled-mode
            return False, ("TRITON_INTERPRET=1 was set after triton was imported (torch may import "
                           "it); set it before importing torch/triton to run the kernels on CPU")
        return True, ""
    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly)"
    return True, ""


def __getattr__(name: str):
    if name == "AVAILABLE":
        return _status()[0]
    if name == "UNAVAILABLE_REASON":
        return _status()[1]
    if name == "DEVICES":
        return ("cpu", "cuda") if _interpreting() else ("cuda",)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _kernels(name: str):
    return importlib.import_module(f"rlfuse.kernels.triton.{name}")


def logprobs_forward(logits, labels, opts, with_entropy):
    return _kernels("logprobs").logprobs_forward(logits, labels, opts, with_entropy)


def logprobs_backward(logits, labels, lse, entropy, grad_logp, grad_entropy, opts, inplace, out=None):
    return _kernels("logprobs").logprobs_backward(logits, labels, lse, entropy, grad_logp,
                                                  grad_entropy, opts, inplace, out=out)


def gae(rewards, values, mask, gamma, lam):
    return _kernels("gae").gae(rewards, values, mask, gamma, lam)


def ppo_loss_forward(logp, old_logp, advantages, mask, ref_logp, entropy, values, old_values,
                     returns, loss_weight, opts):
    return _kernels("ppo_loss").ppo_loss_forward(
        logp, old_logp, advantages, mask, ref_logp, entropy, values, old_values, returns,
        loss_weight, opts)
