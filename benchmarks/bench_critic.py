"""critic: ``ppo.critic=shared`` (value head on the policy's forward) vs ``adapter`` (its own
``value`` LoRA adapter: one more forward + backward per minibatch and scoring pass).

Each run a fresh process (peak memory is per process), the two critics interleaved so machine
load hits both alike: the median PPO step time (iterations after the first) and the peak memory
of training (the one meter, from after the imports), and adapter/shared ratios.

    rlfuse bench --scenarios critic [--repeats 3] [--sizes critic:model=tiny-small,steps=4]
"""

from __future__ import annotations

import json
import statistics
import tempfile

from .spec import RunScenario


def by_length(prompts, completions):
    return [1.0 + len(c) for c in completions]


class CriticScenario(RunScenario):
    """PPO (GAE) step with the value head on the policy's forward (``shared``) vs its own LoRA
    adapter (``adapter``): each run a fresh process, interleaved; median step time (first step
    excluded) and peak memory of training, and adapter/shared ratios."""

    op = "critic"
    title = "Critic layouts: shared forward vs own value adapter"
    engines = ("shared", "adapter")
    metrics = ("step_s", "peak_mb")
    plot_label = "seconds per PPO step"
    sizes_by_preset = {"quick": [dict(model="tiny", steps=2)], "full": [dict(model="tiny-small", steps=4)],
                       "target": [dict(model="tiny-small", steps=4)]}

    def child(self, engine, size, ctx):
        from rlfuse.engine.config import load_config
        from rlfuse.engine.memory import PeakMeter
        from rlfuse.engine.ppo import train_ppo

        rows = []
        with tempfile.TemporaryDirectory() as d:
            prompts = f"{d}/prompts.jsonl"
            with open(prompts, "w") as fh:
                for w in ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]:
                    fh.write(json.dumps({"prompt": f"say {w}"}) + "\n")
            cfg = load_config(None, {"run_dir": f"{d}/run", "device": "cpu", "progress": False, "save_every": 1000,
                                     "model": {"name_or_path": size["model"]},
                                     "ppo": {"prompts": prompts, "max_steps": size["steps"], "batch_size": 4,
                                             "n_samples": 2, "max_new_tokens": 16, "ppo_epochs": 1,
                                             "minibatch_size": 8, "advantage": "gae", "critic": engine}})
            meter = PeakMeter("cpu")
            meter.start()
            train_ppo(cfg, reward_fn=by_length, callbacks=[lambda stage, step, m: rows.append(m)])
        return {"step_s": statistics.median(r["step_time_s"] for r in rows[1:] or rows),
                "peak_mb": meter.peak_extra() / 2**20}

    def finish(self, size, med):
        return {"adapter_over_shared": {k: med["adapter"][k] / med["shared"][k] for k in self.metrics}}

    def columns(self, res):
        m, r = res["median"], res["adapter_over_shared"]
        return [("model, steps", f"{res['size']['model']}, {res['size']['steps']}"),
                ("shared step s", f"{m['shared']['step_s']:.3f}"), ("adapter step s", f"{m['adapter']['step_s']:.3f}"),
                ("adapter/shared time", f"**{r['step_s']:.2f}x**"), ("shared peak MiB", f"{m['shared']['peak_mb']:.0f}"),
                ("adapter peak MiB", f"{m['adapter']['peak_mb']:.0f}"), ("adapter/shared memory", f"**{r['peak_mb']:.2f}x**")]


BENCH = CriticScenario()
