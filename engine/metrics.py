"""What a run directory records: ``metrics.jsonl`` (one row per step), ``samples.jsonl``
(generations), ``summary.json`` (per-stage results), plus peak-memory helpers.

Rows carry ``stage`` and ``step``; on resume, rows past the checkpoint's step (logged by
the killed run after its last checkpoint) are dropped so the file has each step once.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

from .checkpoint import write_json_atomic, write_text_atomic


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    return v


class RunLog:
    def __init__(self, run_dir):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.samples_path = self.dir / "samples.jsonl"
        self.summary_path = self.dir / "summary.json"

    def log(self, row: dict) -> None:
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")

    def samples(self, rows: list[dict]) -> None:
        with self.samples_path.open("a") as fh:
            for row in rows:
                fh.write(json.dumps({k: _jsonable(v) for k, v in row.items()}, ensure_ascii=False) + "\n")

    def truncate(self, stage: str, step: int) -> None:
        """Drop rows of ``stage`` logged after ``step`` (work a killed run redid on resume)."""
        for path in (self.metrics_path, self.samples_path):
            if not path.is_file():
                continue
            kept = [line for line in path.read_text().splitlines() if line.strip()
                    and not (_row(line).get("stage") == stage and _row(line).get("step", 0) > step)]
            write_text_atomic(path, "".join(line + "\n" for line in kept))

    def summary(self) -> dict:
        return json.loads(self.summary_path.read_text()) if self.summary_path.is_file() else {}

    def update_summary(self, stage: str, values: dict) -> dict:
        data = self.summary()
        data[stage] = {k: _jsonable(v) for k, v in values.items()}
        write_json_atomic(self.summary_path, data)
        return data


def _row(line: str) -> dict:
    try:
        return json.loads(line)
    except json.JSONDecodeError:  # a half-written last line from a kill: drop it
        return {"stage": None}


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    rows = [r for r in map(_row, path.read_text().splitlines()) if r.get("stage")]
    if not rows:
        raise ValueError(f"{path}: no metrics logged yet")
    return rows


def reset_peak_memory(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device) -> float:
    """Peak GPU memory allocated since the last reset, or the process's peak RSS on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)
