"""Data-parallel scaling of one PPO (GRPO) step: world size 2 vs 1, same global batch.

Runs ``rlfuse ppo`` on the ``tiny-small`` random Llama with a Python rule reward, in fresh
processes, interleaved over repeats, in three layouts of the same work:

* ``1 proc x 1 thread``  the baseline the scaling efficiency is measured against;
* ``2 procs x 1 thread`` torchrun, gloo, each rank half of the prompts (global batch unchanged);
* ``1 proc x 2 threads`` what the same two cores give without torch.distributed.

Reported: the median over steps (the first, warm-up step excluded) of ``step_time_s`` per
layout, the median over repeats of that, speed-up vs the baseline and the scaling efficiency
``speedup / world_size``. On a 2-core machine the second rank competes with everything else
the machine runs, so the efficiency measured here is a floor, not what a GPU per rank gives.

    python benchmarks/bench_scaling.py [--steps 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
LAYOUTS = {"1 proc x 1 thread": (None, 1), "2 procs x 1 thread": (2, 1), "1 proc x 2 threads": (None, 2)}


def rule_reward(prompts, completions):
    return [sum(ch.isdigit() for ch in c) / (1.0 + len(c)) for c in completions]


def run_layout(nproc, threads: int, work: Path, args) -> float:
    run_dir = Path(tempfile.mkdtemp(dir=work))
    cmd = [sys.executable, "-m", "rlfuse.engine.cli", "ppo", "--no-progress", "--device", "cpu",
           "--model", args.model, "--prompts", str(work / "prompts.jsonl"),
           "--reward-fn", f"{Path(__file__).resolve()}:rule_reward", "--advantage", "grpo",
           "--n-samples", str(args.samples), "--max-steps", str(args.steps), "--run-dir", str(run_dir),
           "--set", f"ppo.batch_size={args.prompts}", "--set", f"ppo.max_new_tokens={args.new_tokens}",
           "--set", "ppo.ppo_epochs=1", "--set", f"ppo.minibatch_size={args.prompts * args.samples}",
           "--set", "save_every=1000"]
    if nproc:
        cmd += ["--nproc-per-node", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{proc.stderr[-2000:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return statistics.median(r["step_time_s"] for r in rows[1:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-small")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(HERE / "results" / "cpu-amd-epyc-2c" / "scaling.md"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rlfuse-scaling-") as tmp:
        work = Path(tmp)
        (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"What's {i}+{2 * i + 1}?"}) + "\n"
                                                    for i in range(64)))
        times: dict[str, list[float]] = {k: [] for k in LAYOUTS}
        for r in range(args.repeats):
            order = list(LAYOUTS) if r % 2 == 0 else list(reversed(LAYOUTS))  # interleaved, order flipped
            for name in order:
                times[name].append(run_layout(*LAYOUTS[name], work, args))
                print(f"repeat {r}: {name}: {times[name][-1]:.3f} s/step", flush=True)
    base = statistics.median(times["1 proc x 1 thread"])
    load = os.getloadavg()[0]
    lines = [f"# Data-parallel scaling, one GRPO step ({args.model}, {args.prompts} prompts x {args.samples} "
             f"samples x {args.new_tokens} tokens)", "",
             f"Machine: {os.cpu_count()}-core CPU, load average {load:.1f} at the end; median of "
             f"{args.repeats} interleaved repeats of the per-step median ({args.steps} steps, first excluded).", "",
             "| layout | step time (s) | speed-up vs 1x1 | scaling efficiency |", "|---|---|---|---|"]
    for name, (nproc, _threads) in LAYOUTS.items():
        t = statistics.median(times[name])
        eff = f"{base / t / (nproc or 1):.0%}" if nproc else "-"
        lines.append(f"| {name} | {t:.3f} | {base / t:.2f}x | {eff} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps({"times": times, "args": vars(args),
                                                               "load": load}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
