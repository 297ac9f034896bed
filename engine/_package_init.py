"""rlfuse.engine: SFT, reward model and PPO on one shared LoRA backbone.

Programmatic use (names load lazily so ``import rlfuse.engine`` stays fast)::

    from rlfuse.engine import load_config, train_sft, train_reward, train_ppo, run_pipeline
    cfg = load_config("tiny", overrides=["run_dir=runs/demo", "sft.data=sft.jsonl"])
    run_pipeline(cfg, reward_fn=my_reward)      # my_reward(prompts, completions) -> list[float]
"""

# An editable install is a link tree whose files are symlinks to the sources (see setup.py); look
# up this package's modules in the source folder itself first, so a new source file imports at
# once, as in any editable install. (A regular install has no symlink here: nothing changes.)
import os as _os

_source = _os.path.dirname(_os.path.realpath(__file__))
if _source != _os.path.dirname(_os.path.abspath(__file__)):
    __path__.insert(0, _source)
del _os, _source


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
