"""rlfuse.engine: SFT, reward model and PPO on one shared LoRA backbone.

Programmatic use (names load lazily so ``import rlfuse.engine`` stays fast)::

    from rlfuse.engine import load_config, train_sft, train_reward, train_ppo, run_pipeline
    cfg = load_config("tiny", overrides=["run_dir=runs/demo", "sft.data=sft.jsonl"])
    run_pipeline(cfg, reward_fn=my_reward)      # my_reward(prompts, completions) -> list[float]
"""

import importlib.util
import os
import sys


def _shield_kernels_name() -> None:
    """bitsandbytes (imported by peft) probes for the Hugging Face ``kernels`` package with
    ``import kernels``. Run from the rlfuse source tree (cwd on sys.path), that name finds our
    ``kernels/`` folder, which then registers every rlfuse custom op a second time under another
    module and corrupts torch's op registry (segfaults, "Declaration: (...) -> ..." errors).
    Make that one import fail cleanly instead; bitsandbytes then falls back as usual."""
    if "kernels" in sys.modules:
        return
    try:
        spec = importlib.util.find_spec("kernels")
    except (ImportError, ValueError):
        return
    if spec is None or not spec.submodule_search_locations:
        return
    ours = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "kernels"))
    if any(os.path.realpath(p) == ours for p in spec.submodule_search_locations):
        sys.modules["kernels"] = None  # `import kernels` now raises ImportError


_shield_kernels_name()

_EXPORTS = {
    "RunConfig": "config", "ModelConfig": "config", "SFTConfig": "config", "RMConfig": "config",
    "PPOConfig": "config", "load_config": "config", "apply_overrides": "config", "save_config": "config",
    "Backbone": "backbone", "load_backbone": "backbone", "load_tokenizer": "backbone",
    "ScalarHead": "heads",
    "train_sft": "sft", "train_reward": "reward", "train_ppo": "ppo", "run_pipeline": "pipeline",
    "KLController": "ppo",
    "Rollout": "rollout", "generate_rollout": "rollout", "score_rollout": "rollout", "load_reward_fn": "rollout",
    "compute_advantages": "advantages", "grpo_advantages": "advantages", "rloo_advantages": "advantages",
    "plot_run": "plot", "compare_memory": "memory",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
