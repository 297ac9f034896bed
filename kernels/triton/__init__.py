"""Triton kernels for rlfuse (the ``triton`` backend, see ``kernels/backends/triton.py``).

Each module holds its kernel(s) then the Python launcher, in the flash-attn / Liger style:

    logprobs.py   online-softmax log-prob / entropy forward and the (in-place) backward
    gae.py        GAE as a reverse associative scan over an affine recurrence
    ppo_loss.py   fused PPO loss: per-token gradients + deterministic per-block stat sums

Importing these modules needs triton. Whether ``@triton.jit`` builds an interpreted or a
compiled kernel is decided at *decoration* time from ``TRITON_INTERPRET``; the backend
imports these modules lazily (on first call) so a test can set the variable first.

Autotuning: the helpers below give the autotune config lists. Under the CPU interpreter
(``TRITON_INTERPRET=1``) they return one small config, so tests do not benchmark. Set
``RLFUSE_TRITON_AUTOTUNE=0`` to pin the default config on a GPU as well: the reduction
order inside a row (and so the last bits of log-probs and PPO stats) depends on the
tile size, and autotuning may pick different tiles in different processes.
"""

from __future__ import annotations

import os

import triton


def interpreting() -> bool:
    """True when Triton runs kernels in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled() -> bool:
    return not interpreting() and os.environ.get("RLFUSE_TRITON_AUTOTUNE", "1") != "0"


def pick_configs(gpu_configs: list[triton.Config], default: triton.Config,
                 interpreter: triton.Config) -> list[triton.Config]:
    """The autotune list for this process: one tiny config under the interpreter, the pinned
    default when autotuning is switched off, else the full Hopper list."""
    if interpreting():
        return [interpreter]
    if not autotune_enabled():
        return [default]
    return gpu_configs
