"""SFT -> reward model -> PPO in one run directory.

Each stage checkpoints under <run_dir>/<stage>/ and PPO picks up the other two from
there. With ``resume``, finished stages are skipped and an interrupted one continues.
"""

from __future__ import annotations

import dataclasses

from .config import RunConfig
from .ppo import train_ppo
from .reward import train_reward
from .rollout import RewardFn
from .sft import train_sft


def run_pipeline(cfg: RunConfig, *, reward_fn: RewardFn | None = None, callbacks=()) -> dict:
    results = {}
    if cfg.sft.data:
        results["sft"] = train_sft(cfg, callbacks=callbacks)
    if (cfg.rm.data or cfg.rm.ratings) and reward_fn is None and not cfg.ppo.reward_fn:
        results["rm"] = train_reward(cfg, callbacks=callbacks)
    if not cfg.ppo.prompts:  # reuse the prompts of the SFT (or preference) data
        cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, prompts=cfg.sft.data or cfg.rm.data))
    if not cfg.ppo.prompts:
        raise ValueError("pipeline needs prompts for PPO: set ppo.prompts (or sft.data / rm.data)")
    results["ppo"] = train_ppo(cfg, reward_fn=reward_fn, callbacks=callbacks)
    return results
