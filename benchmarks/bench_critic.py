"""critic: ppo.critic=shared (value head on the policy's forward) vs adapter (its own
``value`` LoRA adapter: one more forward + backward per minibatch and scoring pass).

    python -m rlfuse.benchmarks.bench_critic [--reps 3] [--steps 4] [--model tiny-small]

Each run is a fresh process (peak RSS is per process), the two critics interleaved
(shared, adapter, shared, adapter, ...) so machine load hits both alike. Reports the median
PPO step time (iterations after the first) and peak RSS of each, and adapter/shared ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile


def by_length(prompts, completions):
    return [1.0 + len(c) for c in completions]


def one_run(critic: str, model: str, steps: int) -> dict:
    import resource

    import torch

    from rlfuse.engine.config import load_config
    from rlfuse.engine.ppo import train_ppo

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        prompts = f"{d}/prompts.jsonl"
        with open(prompts, "w") as fh:
            for w in ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]:
                fh.write(json.dumps({"prompt": f"say {w}"}) + "\n")
        cfg = load_config(None, {"run_dir": f"{d}/run", "device": "cpu", "progress": False, "save_every": 1000,
                                 "model": {"name_or_path": model},
                                 "ppo": {"prompts": prompts, "max_steps": steps, "batch_size": 4, "n_samples": 2,
                                         "max_new_tokens": 16, "ppo_epochs": 1, "minibatch_size": 8,
                                         "advantage": "gae", "critic": critic}})
        train_ppo(cfg, reward_fn=by_length, callbacks=[lambda stage, step, m: rows.append(m)])
    step_times = [r["step_time_s"] for r in rows[1:]]  # the first step pays one-off warm-up
    return {"critic": critic, "step_s": statistics.median(step_times),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--model", default="tiny-small")
    ap.add_argument("--one", choices=["shared", "adapter"])
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one_run(args.one, args.model, args.steps)))
        return
    results = {"shared": [], "adapter": []}
    for _ in range(args.reps):
        for critic in ("shared", "adapter"):
            out = subprocess.run([sys.executable, "-m", "rlfuse.benchmarks.bench_critic", "--one", critic,
                                  "--model", args.model, "--steps", str(args.steps)],
                                 capture_output=True, text=True, check=True)
            results[critic].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(results[critic][-1], flush=True)
    med = {c: {k: statistics.median(r[k] for r in rs) for k in ("step_s", "peak_rss_mb")} for c, rs in results.items()}
    ratios = {k: med["adapter"][k] / med["shared"][k] for k in ("step_s", "peak_rss_mb")}
    print(json.dumps({"median": med, "adapter_over_shared": ratios}, indent=1))


if __name__ == "__main__":
    main()
