"""Bookkeeping shared by the SFT, reward-model and PPO loops: the run directory, seeding,
resume, checkpoints, metrics rows, progress bar and user callbacks.

A trainer builds its model and optimizer, hands them to ``Stage.attach``, calls
``restore()`` (which returns the step to start from), and calls ``end_step`` after each
optimizer step. Everything a resumed run needs to continue exactly where a killed one
stopped (adapter, heads, optimizer moments, step counter, RNG, stage extras) goes into
the checkpoint.

Safety: a stage validates its config before anything loads, holds the run directory's
lock (engine/runlock.py) while it trains, stops (or, with ``nonfinite: skip``, skips the
update) on a non-finite loss or gradient norm via :meth:`Stage.check_update`, and keeps its
own ``<run_dir>/<stage>/config.yaml`` so a later stage cannot change how it resumes.
"""

from __future__ import annotations

import math
import os
import random
import time
import weakref
from pathlib import Path
from typing import Callable, Iterable

import torch

from .checkpoint import (LATEST, CheckpointWriteError, latest_checkpoint, latest_pointer, load_into_backbone,
                         load_trainer_state, rng_state, save_checkpoint, set_rng_state)
from .config import RunConfig, resolve_device, save_config, validate
from . import distributed as D
from .metrics import RunLog
from .optim import apply_lr_schedule, lr_factor
from .runlock import lock_run_dir
from .stop import os_error_message

# callback(stage_name, step, metrics) runs after each step (after its checkpoint, if any)
Callback = Callable[[str, int, dict], None]


class NonFiniteError(ValueError):
    """A NaN/inf loss or gradient norm (the update was not applied)."""


def _no_stage() -> None:
    return None


_active = _no_stage  # weak reference to the stage training now, for the Ctrl-C message


def interrupted_message(reason: str = "interrupted") -> str:
    """What to tell a user whose run was stopped (Ctrl-C, SIGTERM, a full disk: ``reason``):
    where the run was, and how to go on."""
    stage = _active()
    if stage is None:
        return f"{reason}; continue with --resume"
    if not hasattr(stage, "log"):  # stopped while loading: nothing of this stage was written yet
        return f"{reason} before {stage.name} started training; run the same command again"
    ckpt = f"; last checkpoint: {stage.ckpt.name}" if stage.ckpt is not None else "; no checkpoint yet"
    return f"{reason} in {stage.name} at step {stage.step_done}{ckpt}; continue with --resume"


def active_stage_message(reason: str) -> str | None:
    """:func:`interrupted_message` when a stage was running, else None (a label command, say)."""
    return interrupted_message(reason) if _active() is not None else None


def release_active() -> None:
    """Give back the lock of the stage that was training (after Ctrl-C, say)."""
    stage = _active()
    if stage is not None:
        stage.release()


def stage_config_path(run_dir, stage: str) -> Path:
    return Path(run_dir) / stage / "config.yaml"


def _has_run(run_dir: Path) -> bool:
    return (run_dir / "config.yaml").is_file() or (run_dir / "metrics.jsonl").is_file() or any(
        (d / LATEST).is_file() or (d / "config.yaml").is_file() for d in run_dir.iterdir() if d.is_dir())


def _is_main_process() -> bool:  # torchrun ranks > 0 share rank 0's run directory (and lock)
    return int(os.environ.get("RANK", "0")) == 0


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


class Stage:
    def __init__(self, cfg: RunConfig, name: str, callbacks: Iterable[Callback] = ()):
        global _active
        validate(cfg)  # before anything loads or is written
        self.cfg, self.name = cfg, name
        from .dataset_files import configure

        configure(cfg.data)  # split / column names of the datasets this stage reads
        from .tracking import check_installed

        check_installed(cfg.report_to)  # an unknown tracker or missing package: before anything loads
        self.run_dir = Path(cfg.run_dir)
        self.dir = self.run_dir / name
        # joins the torchrun job when there is one (device cuda:LOCAL_RANK on GPUs)
        self.device = D.init(resolve_device(cfg.device), cfg.distributed.timeout_s)
        self.world = D.world()
        section = getattr(cfg, name, None)
        if self.world.distributed and getattr(section, "batch_size", self.world.size) < self.world.size:
            raise ValueError(f"{name}.batch_size={section.batch_size} is global and must be >= the number of "
                             f"processes ({self.world.size}): every rank needs at least one example per step")
        self.callbacks = list(callbacks)
        if cfg.resume and not (self.run_dir.is_dir() and _has_run(self.run_dir)):
            raise ValueError(f"--resume: {self.run_dir} holds no run to resume (no config.yaml, metrics or "
                             "checkpoints); drop --resume to start a new run there")
        if _is_main_process():
            lock = lock_run_dir(self.run_dir)
            self._finalizer = weakref.finalize(self, lock.release)  # also on an exception, once collected
        else:
            self._finalizer = None
        self.ckpt = latest_checkpoint(self.dir, verify=True)
        pointed = latest_pointer(self.dir)
        self.fell_back = pointed if self.ckpt is not None and pointed != self.ckpt.name else None
        if self.ckpt is not None and not cfg.resume:
            self.release()
            raise ValueError(f"{self.dir} already holds a {name} checkpoint; pass --resume to continue it "
                             "or choose a new --run-dir")
        if self.ckpt is not None and (problem := self._resume_mismatch()):
            self.release()  # refused before the model loads, and before anything is written
            raise ValueError(problem)
        set_seed(cfg.seed)
        self.started = time.time()
        self.runtime_before = 0.0  # seconds spent by earlier runs of this stage (from the checkpoint)
        self.step_done = 0
        self.skipped = 0  # updates dropped by nonfinite=skip
        _active = weakref.ref(self)  # weak: an abandoned stage is collected and its lock released

    def _resume_mismatch(self) -> str | None:
        """Why this command cannot continue the checkpoint (a changed adapter shape), or None."""
        import json

        model = self.cfg.model
        try:
            trained = json.loads((self.ckpt / "adapter_config.json").read_bytes())
            trained_r = trained.get("r") if isinstance(trained, dict) else None
        except (OSError, ValueError):
            trained_r = None  # checked by latest_checkpoint(verify=True); nothing to compare
        saved = stage_config_path(self.run_dir, self.name)
        trained_targets = None
        if saved.is_file():
            from .config import load_config

            trained_targets = load_config(saved).model.lora_target_modules
        for key, trained, now in (("lora_r", trained_r, model.lora_r),
                                  ("lora_target_modules", trained_targets, model.lora_target_modules)):
            if trained is not None and trained != now:
                return (f"--resume: {self.ckpt.name} of {self.name} was trained with model.{key}={trained}, this "
                        f"command sets {now}; resume without changing it, or start a new --run-dir to train "
                        "with the new value")
        return None

    def release(self) -> None:
        """Give the run directory's lock back (idempotent)."""
        global _active
        if self._finalizer is not None:
            self._finalizer()
        if _active() is self:
            _active = _no_stage

    def attach(self, backbone, adapter: str, heads: dict[str, torch.nn.Module], optimizer) -> None:
        """What gets checkpointed: one trained adapter, its heads, the optimizer. The run
        directory is written once :meth:`restore` has succeeded (a run that fails on its inputs,
        or a --resume refused while loading the checkpoint, leaves only the lock file)."""
        self.backbone, self.adapter, self.heads, self.optimizer = backbone, adapter, heads, optimizer
        if self.cfg.progress and self.world.is_main and getattr(backbone, "dtype_reason", ""):
            print(f"[rlfuse] {self.name}: base model in {str(backbone.dtype).removeprefix('torch.')} "
                  f"({backbone.dtype_reason})")
        apply_lr_schedule(optimizer, 1.0)  # records each group's base lr before a restore overwrites lr
        from .config import to_dict
        from .tracking import make_trackers

        trackers = make_trackers(self.cfg.report_to, self.run_dir, to_dict(self.cfg)) if self.world.is_main else []
        self.log = RunLog(self.run_dir, writer=self.world.is_main, trackers=trackers)  # rank 0 writes the run dir

    def _save_configs(self) -> None:
        if self.world.is_main:
            # the stage's own copy is what its --resume reads; the top-level one is the latest stage's
            save_config(self.cfg, stage_config_path(self.run_dir, self.name))
            save_config(self.cfg, self.run_dir / "config.yaml")

    def restore(self) -> tuple[int, dict]:
        """(start step, stage extras) -- from the latest checkpoint when resuming. A start
        at or past the stage's total means it already finished (a larger max_steps extends it).
        Either way the metrics log keeps this stage's rows up to the start step only."""
        if self.ckpt is None:
            dropped = self.log.truncate(self.name, 0)  # a killed run's rows before its first checkpoint
            if self.cfg.resume:
                print(f"[rlfuse] {self.name}: no checkpoint in {self.dir} yet; starting it from step 0"
                      + (f" (dropped {dropped} metrics rows of the interrupted run)" if dropped else ""))
            self._save_configs()
            return 0, {}
        if self.fell_back is not None:  # an empty or garbage pointer falls back too, and says so
            print(f"[rlfuse] {self.name}: '{LATEST}' names {self.fell_back or '(nothing)'}, which is missing or "
                  f"incomplete; using {self.ckpt.name}, the newest complete checkpoint")
        state = load_trainer_state(self.ckpt)
        load_into_backbone(self.backbone, self.ckpt, self.adapter, self.heads)
        D.load_optimizer_state(self.optimizer, state["optimizer"])  # re-shards moments under FSDP2
        set_rng_state(state["rng"])
        # everything loaded: only now is the run directory touched
        dropped = self.log.truncate(self.name, state["step"])
        self._save_configs()
        self.runtime_before = float(state.get("runtime_s", 0.0))
        self.step_done = state["step"]
        print(f"[rlfuse] resuming {self.name} from {self.ckpt} (step {state['step']}): restored the adapter"
              + (f", {', '.join(self.heads)}" if self.heads else "") + ", optimizer state and RNG"
              + (f"; dropped {dropped} metrics rows logged after that step" if dropped else ""))
        return state["step"], state.get("extra", {})

    def runtime_s(self) -> float:
        """Training time of this stage over all its runs (a resume adds to it)."""
        return self.runtime_before + time.time() - self.started

    def check_update(self, loss, grad_norm) -> bool:
        """Call between clip_grad_norm_ and optimizer.step(): True to step. A non-finite loss
        or gradient norm raises NonFiniteError (nonfinite: error), or, with nonfinite: skip,
        clears the gradients and returns False so the update is dropped."""
        g, loss = float(grad_norm), float(loss.detach() if isinstance(loss, torch.Tensor) else loss)
        # under data parallelism the grad norm is the same on every rank but the loss is local:
        # decide on what all ranks agree on
        bad = not math.isfinite(g) or (int(os.environ.get("WORLD_SIZE", "1")) == 1 and not math.isfinite(loss))
        if not bad:
            return True
        step = self.step_done + 1
        if self.cfg.nonfinite == "skip":
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            print(f"[rlfuse] {self.name} step {step}: non-finite loss {loss} / grad norm {g}; "
                  f"update skipped ({self.skipped} so far)")
            return False
        last = self.ckpt.name if self.ckpt is not None else "none yet"
        raise NonFiniteError(f"{self.name} step {step}: non-finite loss {loss} / grad norm {g}; stopped "
                             f"before applying it (last checkpoint: {last}). Lower the learning rate or check the "
                             "data, or set nonfinite=skip to drop such updates")

    def save(self, step: int, extra: dict | None = None, done: bool = False) -> Path:
        heads = {f"{name}.{k}": v for name, m in self.heads.items() for k, v in m.state_dict().items()}
        # whole tensors on every rank first (under FSDP2 gathering them is a collective), then rank 0
        # writes: every rank holds the same adapter, so one checkpoint resumes at any world size
        adapter = self.backbone.adapter_state_dict(self.adapter)
        state = {"step": step, "optimizer": D.full_optimizer_state(self.optimizer), "rng": rng_state(),
                 "extra": extra or {}, "done": done, "runtime_s": self.runtime_s(), "world_size": self.world.size}
        if not self.world.is_main:
            self.ckpt = self.dir / f"ckpt-{step:07d}"  # the folder rank 0 writes
            return self.ckpt
        try:
            self.ckpt = save_checkpoint(self.dir, step, adapter=adapter,
                                        adapter_config=self.backbone.adapter_config_dict(), heads=heads,
                                        trainer_state=state, keep=self.cfg.keep_checkpoints)
        except OSError as exc:  # disk full, remounted read-only...: the previous checkpoint is intact
            last = (f"continue with --resume from {self.ckpt.name}, the last complete checkpoint"
                    if self.ckpt is not None else "no checkpoint was written yet: run the same command again")
            raise CheckpointWriteError(f"{self.name} step {step}: could not write checkpoint ckpt-{step:07d} in "
                                       f"{self.dir}: {os_error_message(exc)}; then {last}") from None
        return self.ckpt

    def progress(self, start: int, total: int):
        from tqdm.auto import tqdm

        self.bar = tqdm(range(start, total), initial=start, total=total, desc=self.name, dynamic_ncols=True,
                        disable=not self.cfg.progress or not self.world.is_main)
        return self._scheduled(self.bar, total)

    def _scheduled(self, steps, total: int):
        """Each step with the optimizer's learning rate set for it (the stage's lr_schedule)."""
        c = getattr(self.cfg, self.name)
        for step in steps:
            apply_lr_schedule(self.optimizer, lr_factor(c.lr_schedule, step, total, c.warmup_steps))
            yield step

    def end_step(self, step: int, total: int, metrics: dict, extra: dict | None = None,
                 on_save: Callable[[], dict] | None = None) -> None:
        """Log step ``step`` (1-based count of finished steps), checkpoint when due, run callbacks.
        ``on_save`` may add metrics computed only at checkpoints (e.g. held-out accuracy)."""
        self.step_done = step
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
        """Write the stage's summary (``runtime_s`` summed over resumes) and release the run dir."""
        summary = {"checkpoint": str(self.ckpt) if self.ckpt else None, **summary, "runtime_s": self.runtime_s(),
                   "world_size": self.world.size}
        backbone = getattr(self, "backbone", None)
        if backbone is not None:  # which precision the base ran in, and why (model.dtype=auto chooses)
            summary["model_dtype"] = {"dtype": str(backbone.dtype).removeprefix("torch."),
                                      "reason": backbone.dtype_reason}
        if self.skipped:
            summary["nonfinite_skipped"] = self.skipped
        self.log.update_summary(self.name, summary)
        self.log.close()
        self.release()
        return summary

    def finished_summary(self) -> dict:  # call after attach()
        """A resumed stage that had already finished: report what it wrote then."""
        print(f"[rlfuse] {self.name} already finished in {self.dir}; skipping")
        self.release()
        return self.log.summary().get(self.name, {"checkpoint": str(self.ckpt)})
