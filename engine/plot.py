"""``rlfuse plot RUN_DIR``: training curves from metrics.jsonl, one PNG per stage."""

from __future__ import annotations

import math
from pathlib import Path

from .metrics import read_metrics

# the curves worth a panel, in this order, when the stage logged them
PANELS = ["reward", "kl", "entropy", "clipfrac", "value_loss", "policy_loss", "loss", "bt_loss",
          "train_accuracy", "eval_accuracy", "rating_mse", "kl_coef", "response_length", "tokens_per_s",
          "peak_mem_mb"]


def plot_run(run_dir, out_dir=None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    rows = read_metrics(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stage in dict.fromkeys(r["stage"] for r in rows):  # stages in run order
        stage_rows = [r for r in rows if r["stage"] == stage]
        keys = [k for k in PANELS if any(isinstance(r.get(k), (int, float)) for r in stage_rows)]
        if not keys:
            continue
        cols = min(3, len(keys))
        nrows = math.ceil(len(keys) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
        for ax, key in zip(axes.flat, keys):
            pts = [(r["step"], r[key]) for r in stage_rows if isinstance(r.get(key), (int, float))]
            ax.plot(*zip(*pts), marker="." if len(pts) < 50 else None)
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        fig.suptitle(f"{run_dir.name}: {stage}")
        fig.tight_layout()
        path = out_dir / f"{stage}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
