"""Reward scale: put sequence scores on one scale before PPO uses them.

A Bradley-Terry reward model is defined only up to an offset and a scale, while PPO's
``kl_coef``, ``value_clip``, ``reward_clip`` and ``missing_eos_penalty`` are absolute. So,
as in lm-human-preferences, scores are standardised before use:

    none        the scores as they come (a Python reward function's own, meaningful scale)
    running     (s - mean) / std over every rollout seen so far (moments saved for resume)
    calibrated  (s - mean) / std with the mean/std of the reward model's scores on samples of
                the SFT policy (the policy at step 0), measured once and stored with the RM
                checkpoint (``reward_calibration.json``), so every run on that RM uses one scale

Order on each rollout: normalise -> missing-EOS penalty -> clip to [-reward_clip, reward_clip];
the KL shaping is added afterwards (advantages.py), on the normalised scale.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch

from . import distributed as D

from .checkpoint import write_json_atomic

REWARD_NORMS = ("none", "running", "calibrated")
CALIBRATION_FILE = "reward_calibration.json"
MIN_STD = 1e-6  # a constant reward model must not turn the scale into a division by zero


class RunningMoments:
    """Mean and (population) std of every score seen, merged batch by batch (Chan et al.)."""

    def __init__(self, count: int = 0, mean: float = 0.0, m2: float = 0.0):
        self.count, self.mean, self.m2 = count, mean, m2

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten().cpu()
        n = x.numel()
        if n == 0:
            return
        mean, m2 = x.mean().item(), ((x - x.mean()) ** 2).sum().item()
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 1 else 1.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


class RewardScaler:
    """Turns raw scores [B] (+ which completions were truncated) into the scores PPO optimises."""

    def __init__(self, norm: str = "none", *, mean: float = 0.0, std: float = 1.0, clip: float | None = None,
                 missing_eos_penalty: float | None = None):
        if norm not in REWARD_NORMS:
            raise ValueError(f"ppo.reward_norm: unknown value {norm!r} (use auto, {', '.join(REWARD_NORMS)})")
        self.norm, self.mean, self.std = norm, mean, std
        self.clip, self.missing_eos_penalty = clip, missing_eos_penalty
        self.moments = RunningMoments()

    def __call__(self, scores: torch.Tensor, truncated: torch.Tensor | None = None) -> torch.Tensor:
        scores = scores.float()
        if self.norm == "running":
            self.moments.update(torch.cat(D.gather_objects(scores.cpu())))  # every rank's scores, in rank order
            scores = (scores - self.moments.mean) / max(self.moments.std, MIN_STD)
        elif self.norm == "calibrated":
            scores = (scores - self.mean) / max(self.std, MIN_STD)
        if self.missing_eos_penalty is not None and truncated is not None:
            scores = scores - self.missing_eos_penalty * truncated.to(scores.device, scores.dtype)
        if self.clip is not None:
            scores = scores.clamp(-self.clip, self.clip)
        return scores


def load_or_calibrate(rm_checkpoint: str | Path, sample_scores: Callable[[], torch.Tensor],
                      info: dict | None = None) -> dict:
    """``{"mean", "std", "n", ...}`` from ``<rm_checkpoint>/reward_calibration.json``, or, when
    absent, from ``sample_scores()`` (RM scores of SFT-policy samples), written atomically there
    for every later run on this reward model. ``info``: the settings the scores depend on (SFT
    checkpoint, temperature, samples per prompt, max new tokens), recorded in the file; a file
    measured under other settings is redone (with a log line), never reused silently. Delete
    the file to recalibrate."""
    path = Path(rm_checkpoint) / CALIBRATION_FILE
    info = dict(info or {})
    if path.is_file():
        try:
            stats = json.loads(path.read_text())
            float(stats["mean"]), float(stats["std"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: unreadable reward calibration ({exc}); delete it to recalibrate") from None
        changed = {k: (stats.get(k, "not recorded"), v) for k, v in info.items() if stats.get(k, object()) != v}
        if not changed:
            return stats
        print(f"[rlfuse] {path}: measured under other settings ("
              + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()) + "); recalibrating")
    scores = sample_scores().double().flatten()
    if scores.numel() < 2:
        raise ValueError("reward calibration needs at least 2 sampled completions")
    stats = {"mean": scores.mean().item(), "std": scores.std().item(), "n": scores.numel(), **info}
    if D.world().is_main:  # data-parallel ranks computed the same numbers; one writes them
        write_json_atomic(path, stats)
    return stats
