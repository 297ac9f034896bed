"""Bookkeeping shared by the SFT, reward-model and PPO loops: the run directory, seeding,
resume, checkpoints, metrics rows, progress bar and user callbacks.

A trainer builds its model and optimizer, hands them to ``Stage.attach``, calls
``restore()`` (which returns the step to start from), and calls ``end_step`` after each
optimizer step. Everything a resumed run needs to continue exactly where a killed one
stopped (adapter, heads, optimizer moments, step counter, RNG, stage extras) goes into
the checkpoint.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from .checkpoint import (latest_checkpoint, load_heads, load_safetensors, load_trainer_state, rng_state,
                         save_checkpoint, set_rng_state)
from .config import RunConfig, resolve_device, save_config
from .metrics import RunLog

# callback(stage_name, step, metrics) runs after each step (after its checkpoint, if any)
Callback = Callable[[str, int, dict], None]


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


class Stage:
    def __init__(self, cfg: RunConfig, name: str, callbacks: Iterable[Callback] = ()):
        self.cfg, self.name = cfg, name
        self.run_dir = Path(cfg.run_dir)
        self.dir = self.run_dir / name
        self.device = resolve_device(cfg.device)
        self.callbacks = list(callbacks)
        self.ckpt = latest_checkpoint(self.dir)
        if self.ckpt is not None and not cfg.resume:
            raise ValueError(f"{self.dir} already holds a {name} checkpoint; pass --resume to continue it "
                             "or choose a new --run-dir")
        set_seed(cfg.seed)
        self.started = time.time()

    def attach(self, backbone, adapter: str, heads: dict[str, torch.nn.Module], optimizer) -> None:
        """What gets checkpointed: one trained adapter, its heads, the optimizer. The run
        directory is written from here on (so a run that fails on its inputs leaves none)."""
        self.backbone, self.adapter, self.heads, self.optimizer = backbone, adapter, heads, optimizer
        self.log = RunLog(self.run_dir)
        save_config(self.cfg, self.run_dir / "config.yaml")

    def restore(self) -> tuple[int, dict]:
        """(start step, stage extras) -- from the latest checkpoint when resuming. A start
        at or past the stage's total means it already finished (a larger max_steps extends it)."""
        if self.ckpt is None:
            return 0, {}
        state = load_trainer_state(self.ckpt)
        self.backbone.load_adapter_state_dict(self.adapter, load_safetensors(self.ckpt / "adapter_model.safetensors"))
        heads = load_heads(self.ckpt)
        for name, module in self.heads.items():
            module.load_state_dict({k[len(name) + 1:]: v for k, v in heads.items() if k.startswith(name + ".")})
        self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        self.log.truncate(self.name, state["step"])
        print(f"[rlfuse] resuming {self.name} from {self.ckpt} (step {state['step']})")
        return state["step"], state.get("extra", {})

    def save(self, step: int, extra: dict | None = None, done: bool = False) -> Path:
        heads = {f"{name}.{k}": v for name, m in self.heads.items() for k, v in m.state_dict().items()}
        state = {"step": step, "optimizer": self.optimizer.state_dict(), "rng": rng_state(),
                 "extra": extra or {}, "done": done}
        self.ckpt = save_checkpoint(self.dir, step, adapter=self.backbone.adapter_state_dict(self.adapter),
                                    adapter_config=self.backbone.adapter_config_dict(), heads=heads,
                                    trainer_state=state, keep=self.cfg.keep_checkpoints)
        return self.ckpt

    def progress(self, start: int, total: int):
        from tqdm.auto import tqdm

        self.bar = tqdm(range(start, total), initial=start, total=total, desc=self.name, dynamic_ncols=True,
                        disable=not self.cfg.progress)
        return self.bar

    def end_step(self, step: int, total: int, metrics: dict, extra: dict | None = None,
                 on_save: Callable[[], dict] | None = None) -> None:
        """Log step ``step`` (1-based count of finished steps), checkpoint when due, run callbacks.
        ``on_save`` may add metrics computed only at checkpoints (e.g. held-out accuracy)."""
        if step % max(1, self.cfg.save_every) == 0 or step == total:
            if on_save is not None:
                metrics = {**metrics, **on_save()}
            self.log.log({"stage": self.name, "step": step, **metrics})
            self.save(step, extra, done=step == total)
        else:
            self.log.log({"stage": self.name, "step": step, **metrics})
        if getattr(self, "bar", None) is not None:
            self.bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("loss", "reward", "kl", "eval_accuracy")
                                  if isinstance(metrics.get(k), float)}, refresh=False)
        for cb in self.callbacks:
            cb(self.name, step, metrics)

    def finish(self, summary: dict) -> dict:
        summary = {"checkpoint": str(self.ckpt) if self.ckpt else None, **summary}
        self.log.update_summary(self.name, summary)
        return summary

    def finished_summary(self) -> dict:  # call after attach()
        """A resumed stage that had already finished: report what it wrote then."""
        print(f"[rlfuse] {self.name} already finished in {self.dir}; skipping")
        return self.log.summary().get(self.name, {"checkpoint": str(self.ckpt)})
