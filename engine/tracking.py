"""Training curves to TensorBoard or Weights & Biases, besides ``metrics.jsonl``.

``report_to`` (``--report-to``): none (default) | tensorboard | wandb | "tensorboard,wandb".
``RunLog`` hands every metrics row to the trackers, so they get exactly the scalars the JSONL
gets (numeric fields, tag ``<stage>/<key>``, x-axis the stage's step), from every trainer.

    tensorboard   event files under ``<run_dir>/tensorboard/<stage>/``; a resumed stage purges
                  the events its killed run wrote after the checkpoint (as the JSONL drops rows)
    wandb         one run per run directory (its id kept in ``<run_dir>/wandb_id``, so a resume
                  continues it); offline (synced later with ``wandb sync``) when WANDB_MODE says so
                  or the service cannot be reached. A tracker never fails a run: an error is
                  reported once and the tracker switches off.
"""

from __future__ import annotations

import math
import os
import socket
import sys
from pathlib import Path

KINDS = ("tensorboard", "wandb")
INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb"}


def parse(report_to: str | None) -> list[str]:
    """The tracker names of a ``report_to`` value, checked (a one-line error otherwise)."""
    names = [n.strip() for n in (report_to or "none").split(",") if n.strip()]
    if names in ([], ["none"]):
        return []
    bad = [n for n in names if n not in KINDS]
    if bad:
        raise ValueError(f"report_to: unknown tracker {bad[0]!r} (use none, tensorboard, wandb, or a comma list)")
    return list(dict.fromkeys(names))


def check_installed(report_to: str | None) -> None:
    """Fail before training, with the install command, when a tracker's package is missing."""
    import importlib.util

    for name in parse(report_to):
        module = "tensorboard" if name == "tensorboard" else "wandb"
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"--report-to {name} needs the {module} package: {INSTALL[name]} "
                             "(or pip install 'rlfuse[tracking]')")


def scalars(row: dict) -> dict[str, float]:
    """The numeric, finite fields of a metrics row (what a chart can draw)."""
    out = {}
    for k, v in row.items():
        if k in ("stage", "step") or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(v):
            out[k] = float(v)
    return out


def _warn(message: str) -> None:
    print(f"[rlfuse] warning: {message}", file=sys.stderr)


class TensorBoardTracker:
    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir) / "tensorboard"
        self.writers = {}

    def log(self, row: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        stage, step = row.get("stage"), row.get("step")
        if stage is None or step is None:
            return
        writer = self.writers.get(stage)
        if writer is None:  # the first step this process logs: events at or after it are stale
            writer = self.writers[stage] = SummaryWriter(log_dir=str(self.dir / stage), purge_step=int(step))
        for key, value in scalars(row).items():
            writer.add_scalar(f"{stage}/{key}", value, int(step))
        writer.flush()  # a killed run keeps its curves up to the last step

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers = {}


def _reachable(host: str = "api.wandb.ai", port: int = 443, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class WandbTracker:
    def __init__(self, run_dir: Path, config: dict | None = None):
        self.run_dir, self.config = Path(run_dir), config or {}
        self.run = None
        self.failed = False
        self.defined: set[str] = set()

    def _start(self) -> None:
        import wandb

        id_file = self.run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        mode = os.environ.get("WANDB_MODE") or ("online" if _reachable() else "offline")
        kwargs = dict(project=os.environ.get("WANDB_PROJECT", "rlfuse"), name=self.run_dir.name,
                      dir=str(self.run_dir), config=self.config, id=run_id, resume="allow" if run_id else None)
        try:
            self.run = wandb.init(mode=mode, **kwargs)
        except Exception as exc:  # the service failed us: keep the curves locally instead
            if mode == "offline":
                raise
            _warn(f"wandb: cannot reach the service ({type(exc).__name__}: {exc}); logging offline "
                  "(upload later with `wandb sync`)")
            self.run = wandb.init(mode="offline", **kwargs)
        if run_id is None and getattr(self.run, "id", None):
            id_file.write_text(str(self.run.id) + "\n")

    def log(self, row: dict) -> None:
        if self.failed:
            return
        stage, step = row.get("stage"), row.get("step")
        try:
            if self.run is None:
                self._start()
            if stage not in self.defined:  # each stage counts its own steps (a pipeline restarts at 1)
                self.run.define_metric(f"{stage}/step")
                self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
                self.defined.add(stage)
            self.run.log({f"{stage}/step": step, **{f"{stage}/{k}": v for k, v in scalars(row).items()}})
        except Exception as exc:
            self.failed = True
            _warn(f"wandb: {type(exc).__name__}: {exc}; W&B logging is off for the rest of this run "
                  "(metrics.jsonl still has every row)")

    def close(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as exc:
                _warn(f"wandb: finishing the run failed ({exc})")
            self.run = None


def make_trackers(report_to: str | None, run_dir, config: dict | None = None) -> list:
    trackers = []
    for name in parse(report_to):
        trackers.append(TensorBoardTracker(run_dir) if name == "tensorboard" else WandbTracker(run_dir, config))
    return trackers
