"""What a run directory records: ``metrics.jsonl`` (one row per step), ``samples.jsonl``
(generations), ``summary.json`` (per-stage results), plus peak-memory helpers.

Rows carry ``stage`` and ``step``; on resume, rows past the checkpoint's step (logged by
the killed run after its last checkpoint) are dropped so the file has each step once.
"""

from __future__ import annotations

import json
import resource
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from .checkpoint import write_json_atomic, write_text_atomic


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    return v


class RunLog:
    """``writer=False`` (data-parallel ranks > 0): reads work, writes are dropped, so the one
    run directory is written by rank 0 only."""

    def __init__(self, run_dir, writer: bool = True, trackers=()):
        self.dir = Path(run_dir)
        self.writer = writer
        self.trackers = list(trackers) if writer else []  # TensorBoard / W&B (engine/tracking.py)
        if writer:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.samples_path = self.dir / "samples.jsonl"
        self.summary_path = self.dir / "summary.json"

    def log(self, row: dict) -> None:
        if not self.writer:
            return
        row = {k: _jsonable(v) for k, v in row.items()}
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        for tracker in self.trackers:  # the same row, so the curves match metrics.jsonl
            tracker.log(row)

    def close(self) -> None:
        """Flush and close the trackers (the JSONL needs nothing)."""
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []

    def samples(self, rows: list[dict]) -> None:
        if not self.writer:
            return
        with self.samples_path.open("a") as fh:
            for row in rows:
                fh.write(json.dumps({k: _jsonable(v) for k, v in row.items()}, ensure_ascii=False) + "\n")

    def truncate(self, stage: str, step: int) -> int:
        """Drop rows of ``stage`` logged after ``step`` (work a killed run redid on resume;
        ``step`` 0 when it died before its first checkpoint). Returns the metrics rows dropped."""
        dropped = 0
        for path in (self.metrics_path, self.samples_path) if self.writer else ():
            if not path.is_file():
                continue
            raw = path.read_bytes()
            text = raw.decode("utf-8", errors="replace")  # damaged bytes: \ufffd, so the file is rewritten
            lines = [line for line in text.splitlines() if line.strip()]
            kept = [line for line in lines if _complete(line)  # a half-written last line from a kill goes
                    and not (_row(line).get("stage") == stage and _row(line).get("step", 0) > step)]
            damaged = text.encode() != raw  # invalid UTF-8 was replaced: write back the repaired text
            if len(kept) != len(lines) or not text.endswith("\n") or damaged:  # rewrite only when something goes
                write_text_atomic(path, "".join(line + "\n" for line in kept))
            if path == self.metrics_path:
                dropped = len(lines) - len(kept)
        return dropped

    def summary(self) -> dict:
        if not self.summary_path.is_file():
            return {}
        try:
            data = json.loads(self.summary_path.read_bytes())
        except ValueError:  # not UTF-8 or not JSON
            data = None
        if isinstance(data, dict):
            return data
        # derived data, rewritten as stages finish: keep the damaged copy aside and start afresh
        aside = self.summary_path.with_name(self.summary_path.name + ".damaged")
        if self.writer:
            self.summary_path.replace(aside)
        print(f"[rlfuse] warning: {self.summary_path} is damaged (not a JSON object); "
              + (f"moved it to {aside.name} and starting a new one" if self.writer else "ignoring it"))
        return {}

    def update_summary(self, stage: str, values: dict) -> dict:
        data = self.summary()
        data[stage] = {k: _jsonable(v) for k, v in values.items()}
        if self.writer:
            write_json_atomic(self.summary_path, data)
        return data


def _complete(line: str) -> bool:
    try:
        row = json.loads(line)
        # a row (its step a number); anything else is damage
        return isinstance(row, dict) and isinstance(row.get("step", 0), (int, float))
    except json.JSONDecodeError:
        return False


def _row(line: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:  # a half-written last line from a kill: drop it
        return {"stage": None}
    return row if isinstance(row, dict) else {"stage": None}


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    rows = [r for r in map(_row, path.read_text().splitlines()) if r.get("stage")]
    if not rows:
        raise ValueError(f"{path}: no metrics logged yet")
    return rows


_PROCESS_PEAK = [0.0]  # CPU peaks (MiB) folded in before each reset of the kernel's high-water mark
_OPEN_PHASES: list[list[float]] = []  # running peak of each open MemoryPhases block (they nest)


def reset_peak_memory(device) -> None:
    """Start a new peak: CUDA's allocator peak, or on Linux the process's RSS high-water mark
    (``/proc/self/clear_refs``), so peaks can be told apart per step and per phase."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    hwm = _proc_status_mb("VmHWM")
    if hwm is not None:  # the peak being cleared still counts for the process and every open phase
        for running in [_PROCESS_PEAK, *_OPEN_PHASES]:
            running[0] = max(running[0], hwm)
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # 5: reset the peak RSS (VmHWM) to the current RSS
    except OSError:  # not Linux: the peak stays the process's lifetime peak
        pass


def _proc_status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    return None


def process_peak_rss_mb() -> float:
    """Peak RSS of the whole process so far, resets of the per-phase peak included."""
    hwm = _proc_status_mb("VmHWM")
    return max(_PROCESS_PEAK[0], hwm if hwm is not None else peak_memory_mb("cpu"))


def rss_mb() -> float:
    """Resident memory of this process now (MiB)."""
    now = _proc_status_mb("VmRSS")
    return now if now is not None else peak_memory_mb("cpu")


def peak_memory_mb(device) -> float:
    """Peak GPU memory allocated since the last reset, or on CPU the peak RSS since the last
    reset (Linux) or of the whole process (elsewhere)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    hwm = _proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


class MemoryPhases:
    """Peak memory per named phase: ``with phases("generation"): ...`` records the peak
    inside the block (a repeated name keeps the largest; blocks may nest, e.g. a demo stage
    around PPO's per-step phases) and the memory held after it. CPU peaks are RSS (Linux)."""

    def __init__(self, device):
        self.device = device
        self.peak_mb: dict[str, float] = {}
        self.after_mb: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        reset_peak_memory(self.device)
        running = [0.0]  # what nested phases reset inside this block
        _OPEN_PHASES.append(running)
        try:
            yield
        finally:
            del _OPEN_PHASES[next(i for i, r in enumerate(_OPEN_PHASES) if r is running)]  # by identity
            peak = max(peak_memory_mb(self.device), running[0])
            self.peak_mb[name] = max(peak, self.peak_mb.get(name, 0.0))
            self.after_mb[name] = (torch.cuda.memory_allocated(self.device) / 2**20
                                   if torch.device(self.device).type == "cuda" else rss_mb())

    def as_metrics(self, prefix: str = "peak_mem_") -> dict[str, float]:
        return {f"{prefix}{name}_mb": round(v, 1) for name, v in self.peak_mb.items()}
