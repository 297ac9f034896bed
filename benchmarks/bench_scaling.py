"""Data-parallel scaling of one PPO (GRPO) step: world size 2 vs 1, same global batch.

``rlfuse ppo`` on the ``tiny-small`` random Llama with a Python rule reward, each run a fresh
process (torchrun for two ranks), the layouts interleaved over repeats, three layouts of the same
work:

* ``1x1``  one process, one thread: the baseline the scaling efficiency is measured against;
* ``2x1``  torchrun, gloo, two ranks of one thread, each half of the prompts (global batch unchanged);
* ``1x2``  one process, two threads: what the same two cores give without torch.distributed.

Reported: the median over steps (the first, warm-up step excluded) of ``step_time_s`` per layout,
the median over repeats, speed-up vs 1x1 and the efficiency ``speedup / world_size``. The matmul
floor is measured in the 1x1 run (``roofline.MatmulFloor`` around an in-process run of the same
command); two ranks or two threads halve it at best, so each layout's "% of floor" is floor /
(cores x time). On a 2-core machine the second rank competes with everything else the machine
runs, so the efficiency here is a floor, not what a GPU per rank gives.

    rlfuse bench --scenarios scaling [--repeats 3]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from .spec import RunScenario, fraction, pct

LAYOUTS = {"1x1": (None, 1), "2x1": (2, 1), "1x2": (None, 2)}  # name -> (torchrun ranks, threads)


def rule_reward(prompts, completions):
    return [sum(ch.isdigit() for ch in c) / (1.0 + len(c)) for c in completions]


def _command(size, work: Path, run_dir: Path) -> list[str]:
    return ["ppo", "--no-progress", "--device", "cpu", "--model", size["model"],
            "--prompts", str(work / "prompts.jsonl"), "--reward-fn", "rlfuse.benchmarks.bench_scaling:rule_reward",
            "--advantage", "grpo", "--n-samples", str(size["G"]), "--max-steps", str(size["steps"]),
            "--run-dir", str(run_dir), "--set", f"ppo.batch_size={size['P']}", "--set", f"ppo.max_new_tokens={size['L']}",
            "--set", "ppo.ppo_epochs=1", "--set", f"ppo.minibatch_size={size['P'] * size['G']}", "--set", "save_every=1000"]


class ScalingScenario(RunScenario):
    """Data-parallel scaling of one GRPO step (see ``bench_scaling.py``'s docstring): layouts of the
    same global batch, each run a fresh process, interleaved; median step time, speed-up vs one
    process with one thread, efficiency = speed-up / ranks. Floor = the step's weight matmuls alone
    (measured in the 1x1 run); "% of floor" = floor / (cores used x step time)."""

    op = "scaling"
    title = "Data-parallel scaling, one GRPO step"
    engines = tuple(LAYOUTS)
    metrics = ("step_s", "matmul_gflop", "matmul_floor_s")
    plot_label = "seconds per GRPO step"
    timeout_s = 1800
    _base = dict(model="tiny-small", P=8, G=4, L=32, steps=4)
    sizes_by_preset = {"quick": [dict(_base, model="tiny", P=2, G=2, L=8, steps=2)], "full": [_base], "target": [_base]}

    def prepare(self, size, workdir):
        (Path(workdir) / "prompts.jsonl").write_text(
            "".join(json.dumps({"prompt": f"What's {i}+{2 * i + 1}?"}) + "\n" for i in range(64)))
        return {"work": workdir}

    def child(self, engine, size, ctx):
        nproc, threads = LAYOUTS[engine]
        work = Path(ctx["work"])
        run_dir = Path(tempfile.mkdtemp(dir=work))
        cmd = _command(size, work, run_dir)
        out = {}
        if nproc:
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
            proc = subprocess.run([sys.executable, "-m", "rlfuse.engine.cli", *cmd, "--nproc-per-node", str(nproc)],
                                  env=env, capture_output=True, text=True, timeout=self.timeout_s)
            if proc.returncode != 0:
                raise RuntimeError(f"rlfuse {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        else:  # in this process: the floor's counter sees the run's own matmuls
            import torch

            import rlfuse.engine.ppo as ppo
            from rlfuse.engine.cli import main as cli_main

            from .roofline import MatmulFloor
            torch.set_num_threads(threads)
            build, counters = ppo.build_ppo_backbone, []

            def counted(*a, **kw):
                res = build(*a, **kw)
                counters.append(MatmulFloor(res[0].model).__enter__())
                return res

            ppo.build_ppo_backbone = counted
            if cli_main(cmd) != 0:
                raise RuntimeError(f"rlfuse {' '.join(cmd)} failed")
            for c in counters:
                c.__exit__(None, None, None)
            if engine == "1x1":
                f = counters[0].floor(scale=1.0 / size["steps"])
                out = {"matmul_gflop": f["gflop"], "matmul_floor_s": f["floor_s"]}
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        return {"step_s": statistics.median(r["step_time_s"] for r in rows[1:] or rows), **out}

    def finish(self, size, med):
        base = med["1x1"]["step_s"]
        floor = med["1x1"].get("matmul_floor_s")
        for name, (nproc, threads) in LAYOUTS.items():
            m = med[name]
            m["speedup"] = base / m["step_s"]
            m["efficiency"] = m["speedup"] / nproc if nproc else None
            m["floor_fraction"] = fraction(floor, m["step_s"] * (nproc or 1) * threads)
        return {"matmul_floor_s": floor}

    def stem(self, res):
        s = res["size"]
        return f"scaling-{s['model']}-P{s['P']}G{s['G']}L{s['L']}"

    def columns(self, res):
        s, m = res["size"], res["median"]
        cells = [("model, P x G x L", f"{s['model']}, {s['P']}x{s['G']}x{s['L']}")]
        for name in LAYOUTS:
            eff = m[name].get("efficiency")
            cells.append((f"{name} step s (speed-up, efficiency, % of floor)",
                          f"{m[name]['step_s']:.3f} ({m[name]['speedup']:.2f}x, {pct(eff)}, "
                          f"**{pct(m[name].get('floor_fraction'))}**)"))
        floor = res.get("matmul_floor_s")
        return cells + [("floor s (1 core)", "-" if floor is None else f"{floor:.3f}")]

    def plot_values(self, res):
        return {e: m["step_s"] for e, m in res["median"].items()}


BENCH = ScalingScenario()
