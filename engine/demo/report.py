"""The demo's report: ``demo_summary.json``, ``demo_table.md``, the PPO learning curves
(``ppo_curves.png``) and the README's table, all made from the run's own numbers.

    python -m rlfuse.engine.demo.report RUN/demo_summary.json --readme README.md [--ceiling RUN2/demo_summary.json]
        rewrites the table between README's ``<!-- demo-table -->`` markers from those summaries
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from ..checkpoint import write_json_atomic, write_text_atomic
from ..evaluate import compare, summarize
from ..metrics import process_peak_rss_mb, read_metrics, rss_mb
from .task import answered, write_jsonl

STAGES = ("base", "sft", "ppo")
MARK_START, MARK_END = "<!-- demo-table -->", "<!-- /demo-table -->"


def rss_now() -> float:
    return round(rss_mb(), 1)


def stage_row(stage: str, rows: list[dict]) -> dict:
    s = summarize(rows)
    return {"stage": stage, **s, "answered_rate": sum(answered(r["prompt"], r["completion"]) for r in rows) / len(rows)}


def curve(run_dir: Path, summaries: dict) -> list[dict]:
    """PPO's per-iteration training metrics, with the held-out accuracy of each saved checkpoint
    (iteration 0: the SFT policy) where there is one."""
    rows = [r for r in read_metrics(run_dir) if r.get("stage") == "ppo"]
    last = max((r["step"] for r in rows), default=0)
    heldout = {0: summaries["sft"]}
    heldout.update({int(k.split("@")[1]): v for k, v in summaries.items() if k.startswith("ppo@")})
    heldout[last] = summaries["ppo"]
    points = [{"step": r["step"], **{k: r.get(k) for k in ("reward", "reward_scaled", "kl", "value_loss",
                                                              "response_length")}} for r in rows]
    accuracy = [{"step": k, "accuracy": v["accuracy"], "accuracy_ci95": v["accuracy_ci95"],
                 "mean_reward": v["mean_reward"], "kl_to_ref": v.get("kl_to_ref")} for k, v in sorted(heldout.items())]
    return {"training": points, "heldout": accuracy}


def plot_curves(c: dict, path: Path, title: str) -> Path:
    """Four panels: RM reward, KL to the reference, value loss per iteration; held-out accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    steps = [p["step"] for p in c["training"]]
    for ax, key, label in zip(axes, ("reward", "kl", "value_loss"),
                              ("reward-model score (raw)", "KL to the SFT reference (nats/answer)", "value loss")):
        ax.plot(steps, [p[key] for p in c["training"]], marker="o", ms=3)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("PPO iteration")
    ax = axes[3]
    h = c["heldout"]
    ax.errorbar([p["step"] for p in h], [100 * p["accuracy"] for p in h],
                yerr=[[100 * (p["accuracy"] - p["accuracy_ci95"][0]) for p in h],
                      [100 * (p["accuracy_ci95"][1] - p["accuracy"]) for p in h]], marker="o", capsize=3)
    ax.set_title("held-out accuracy, % (95% Wilson)", fontsize=10)
    ax.set_xlabel("PPO iteration (0: SFT)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _pct(lo_hi) -> str:
    return f"[{lo_hi[0]:.1%}, {lo_hi[1]:.1%}]"


def table_markdown(summary: dict, ceiling: dict | None = None) -> str:
    """The measured table: one row per stage, the paired comparison, the diagnostics (best-of-n
    under the reward model; with ``ceiling``, a run of the same recipe whose PPO optimised the
    task's grader itself)."""
    md = ["| stage | n | accuracy (95% CI) | mean reward ± SE | RM score | answers both |", "|---|---|---|---|---|---|"]
    for r in summary["stages"]:
        rm = f"{r['mean_rm_score']:+.2f}" if "mean_rm_score" in r else ""
        md.append(f"| {r['stage']} | {r['n']} | {r['accuracy']:.1%} {_pct(r['accuracy_ci95'])} | "
                  f"{r['mean_reward']:.3f} ± {r['mean_reward_se']:.3f} | {rm} | {r['answered_rate']:.0%} |")
    c = summary["comparisons"]["PPO vs SFT"]
    rm = summary["reward_model"]
    md += ["", f"PPO vs SFT ({summary['ppo_kind']}): **{c['accuracy_diff']:+.1%}** accuracy, 95% paired-bootstrap CI "
               f"[{c['accuracy_diff_ci95'][0]:+.1%}, {c['accuracy_diff_ci95'][1]:+.1%}] "
               f"({c['prompts_gained']} prompts gained, {c['prompts_lost']} lost, McNemar p = {c['mcnemar_p']:.2g}); "
               f"mean reward {c['reward_diff']:+.3f} [{c['reward_diff_ci95'][0]:+.3f}, {c['reward_diff_ci95'][1]:+.3f}]; "
               f"reward-model win rate {c.get('rm_win_rate', float('nan')):.0%}.",
           f"Reward model: {rm['rankings']} K-way rankings ({rm['on_policy_pairs']} pairs) + {rm['synthetic_pairs']} "
           f"synthetic pairs; pairwise accuracy on its held-out rankings {rm.get('pair_eval_accuracy') or float('nan'):.0%}, "
           f"AUC right vs wrong on the SFT policy's held-out answers **{rm['heldout_auc']:.2f}**."]
    if summary.get("best_of"):
        b = summary["best_of"]
        md.append(f"Best-of-{b['samples_per_prompt']} under the reward model ({b['prompts']} held-out prompts, SFT "
                  f"samples at T={summary['data']['annotate_temperature']}): its pick is right "
                  f"{b['rm_pick_accuracy']:.1%}, a random sample {b['sample_accuracy']:.1%}, any sample "
                  f"{b['oracle_accuracy']:.1%}.")
    if ceiling is not None:
        r, x = ceiling_numbers(ceiling)
        md.append(f"Ceiling: PPO with the task's grader as its reward (the same settings, from the same SFT "
                  f"policy) reaches {r['accuracy']:.1%} {_pct(r['accuracy_ci95'])}, vs SFT {x['accuracy_diff']:+.1%} "
                  f"[{x['accuracy_diff_ci95'][0]:+.1%}, {x['accuracy_diff_ci95'][1]:+.1%}].")
    mem = summary["memory"]
    md.append(f"Cost: {summary['wall_time_s'] / 60:.1f} min wall, {summary['process_cpu_time_s'] / 60:.1f} CPU-min, "
              f"peak RSS {mem['peak_rss_mb'] / 1024:.2f} GiB; {summary['machine']}, load average "
              f"{summary['loadavg_start'][0]:.1f} at the start, {summary['loadavg_end'][0]:.1f} at the end.")
    return "\n".join(md) + "\n"


def ceiling_numbers(c: dict) -> tuple[dict, dict]:
    """(the PPO row, PPO vs SFT) of a ceiling run: a demo summary, or the ``eval.json`` of
    ``rlfuse eval --checkpoints SFT PPO`` (the PPO trained with the grader as ``--reward-fn``)."""
    if "comparisons" in c:
        return c["stages"][-1], c["comparisons"]["PPO vs SFT"]
    first, last = list(c["checkpoints"])[0], list(c["checkpoints"])[-1]
    return c["checkpoints"][last], c["pairs"][f"{last} vs {first}"]


def update_readme(readme: Path, summary: dict, ceiling: dict | None = None) -> None:
    """Replace the table between the README's markers with ``table_markdown(summary, ceiling)``."""
    text = readme.read_text(encoding="utf-8")
    if MARK_START not in text or MARK_END not in text:
        raise ValueError(f"{readme}: no {MARK_START} ... {MARK_END} block to rewrite")
    head, rest = text.split(MARK_START, 1)
    _, tail = rest.split(MARK_END, 1)
    write_text_atomic(readme, f"{head}{MARK_START}\n{table_markdown(summary, ceiling)}{MARK_END}{tail}")


def machine() -> str:
    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name or 'CPU'}, {os.cpu_count()} cores"


def write(demo, answers: dict, result: dict, engine: dict, info: dict, memory, timings: dict, started: dict) -> dict:
    """Everything the run measured, in ``demo_summary.json`` / ``demo_table.md`` / ``ppo_curves.png``."""
    import torch

    from ..advantages import get_estimator

    cfg, run_dir = demo.cfg, demo.run_dir
    for stage in STAGES:
        write_jsonl(run_dir / f"eval_{stage}.jsonl", answers[stage])
    stages = [stage_row(s, answers[s]) for s in STAGES]
    rm = {**info["reward_model"], "pair_eval_accuracy": engine["rm"].get("eval_accuracy"),
          "heldout_auc": result["checkpoints"]["sft"].get("rm_auc")}
    crit = get_estimator(cfg.ppo.advantage).needs_critic
    c = curve(run_dir, result["checkpoints"])
    summary = {
        "model": Path(demo.source_model).name, "model_source": demo.source_model, "preset": f"demo-{demo_preset(cfg)}",
        "ppo_advantage": cfg.ppo.advantage, "ppo_reward": cfg.ppo.reward_fn or "reward model",
        "ppo_kind": (f"{cfg.ppo.advantage.upper()} + value head" if crit else cfg.ppo.advantage)
                    + (f", reward {cfg.ppo.reward_fn}" if cfg.ppo.reward_fn else ", learned RM"),
        "run_dir": str(run_dir), "seed": cfg.seed, "device": cfg.device, "torch_threads": torch.get_num_threads(),
        "stage_names": list(STAGES), "stages": stages,
        "comparisons": {"SFT vs base": compare(answers["base"], answers["sft"], seed=cfg.seed),
                        "PPO vs SFT": compare(answers["sft"], answers["ppo"], seed=cfg.seed)},
        "checkpoints": result["checkpoints"], "curve": c, "reward_model": rm, "best_of": info.get("best_of"),
        "noise_method": ("paired over the same held-out prompts (greedy decoding): 95% percentile bootstrap CI of the "
                         "per-prompt difference (10,000 resamples), McNemar exact test on discordant prompts; Wilson "
                         "95% CI per stage. 'beyond noise' = the CI of the accuracy or reward difference excludes 0."),
        "data": {"heldout_prompts": len(demo.heldout), **{f"{k}_prompts": len(v) for k, v in demo.splits.items()},
                 "system_prompt": cfg.demo.system, "annotate_samples": cfg.demo.annotate_samples,
                 "annotate_temperature": cfg.demo.annotate_temperature, "max_new_tokens": cfg.demo.max_new_tokens},
        "engine_results": engine,
        "memory": {"peak_rss_mb": round(process_peak_rss_mb(), 1), "model_loaded_rss_mb": info.get("model_loaded_rss_mb"),
                   "stage_peak_mb": {k: round(v, 1) for k, v in memory.peak_mb.items() if k != "5_evaluate"},
                   "stage_rss_after_mb": {k: round(v, 1) for k, v in memory.after_mb.items() if k != "5_evaluate"},
                   "evaluate_peak_mb": round(memory.peak_mb.get("5_evaluate", 0.0), 1),
                   "ppo_phase_peak_mb": ppo_phase_peaks(run_dir)},
        "timings_s": timings, "wall_time_s": time.perf_counter() - started["wall"],
        "process_cpu_time_s": time.process_time() - started["cpu"], "machine": machine(),
        "cpu_count": os.cpu_count(), "loadavg_start": started["load"], "loadavg_end": os.getloadavg(),
        "examples": examples(answers),
    }
    write_json_atomic(run_dir / "demo_summary.json", summary)
    write_text_atomic(run_dir / "demo_table.md", table_markdown(summary))
    plot_curves(c, run_dir / "ppo_curves.png", f"rlfuse demo: PPO ({summary['ppo_kind']}), {summary['model']}")
    print_summary(summary)
    return summary


class StageTimer:
    """One numbered stage: its wall time and peak memory, as a ``demo`` row of metrics.jsonl."""

    def __init__(self, name, memory, log, timings):
        self.name, self.memory, self.log, self.timings = name, memory, log, timings

    def __enter__(self):
        self.t, self.inner = time.perf_counter(), self.memory(self.name)
        self.inner.__enter__()

    def __exit__(self, *exc):
        self.inner.__exit__(*exc)
        if exc[0] is None:
            self.timings[self.name] = round(time.perf_counter() - self.t, 2)
            self.log.log({"stage": "demo", "step": len(self.timings), "demo_stage": self.name,
                          "peak_mem_mb": round(self.memory.peak_mb[self.name], 1),
                          "rss_after_mb": round(self.memory.after_mb[self.name], 1), "time_s": self.timings[self.name]})
        return False


def demo_preset(cfg) -> str:
    return "tiny" if cfg.model.name_or_path == "tiny" else "smollm2"


def ppo_phase_peaks(run_dir: Path) -> dict[str, float]:
    """The largest per-iteration peak of each PPO phase (generation, scoring, update)."""
    peaks: dict[str, float] = {}
    for row in read_metrics(run_dir):
        if row.get("stage") == "ppo":
            for k, v in row.items():
                if k.startswith("peak_mem_") and k.endswith("_mb") and isinstance(v, (int, float)):
                    peaks[k] = round(max(v, peaks.get(k, 0.0)), 1)
    return peaks


def examples(answers: dict, k: int = 3) -> list[dict]:
    """A few held-out prompts with every stage's answer: ones PPO fixed first."""
    n = len(answers["sft"])
    fixed = [i for i in range(n) if answers["ppo"][i]["correct"] and not answers["sft"][i]["correct"]]
    picks = (fixed[:2] + [i for i in range(n) if i not in fixed])[:k]
    return [{"prompt": answers["base"][i]["prompt"],
             **{s: {"answer": answers[s][i]["completion"], "correct": answers[s][i]["correct"]} for s in STAGES}}
            for i in picks]


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"rlfuse demo: {summary['model']} on \"What's a±b and c±d?\" (held-out, greedy)")
    for col in ("stage", "n", "accuracy (95% CI)", "mean reward ± SE", "RM score", "answers both"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for r in summary["stages"]:
        table.add_row(r["stage"], str(r["n"]), f"{r['accuracy']:.1%} {_pct(r['accuracy_ci95'])}",
                      f"{r['mean_reward']:.3f} ± {r['mean_reward_se']:.3f}",
                      f"{r['mean_rm_score']:+.2f}" if "mean_rm_score" in r else "-", f"{r['answered_rate']:.0%}")
    console = Console()
    console.print(table)
    for line in table_markdown(summary).split("\n\n", 1)[1].strip().splitlines():
        console.print(line.replace("**", ""), markup=False)
    console.print(f"run directory {summary['run_dir']}", markup=False)


def main(argv=None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m rlfuse.engine.demo.report", description=__doc__.split("\n\n")[0])
    p.add_argument("summary", help="a demo run's demo_summary.json")
    p.add_argument("--readme", help="rewrite the table between this file's demo-table markers")
    p.add_argument("--ceiling", help="a ceiling run (PPO with the grader as reward_fn): its demo_summary.json, "
                                      "or rlfuse eval's eval.json of SFT and that PPO")
    p.add_argument("--png", help="draw the PPO curves to this file")
    args = p.parse_args(argv)
    summary = json.loads(Path(args.summary).read_text())
    ceiling = json.loads(Path(args.ceiling).read_text()) if args.ceiling else None
    if args.readme:
        update_readme(Path(args.readme), summary, ceiling)
    if args.png:
        plot_curves(summary["curve"], Path(args.png), f"rlfuse demo: PPO ({summary['ppo_kind']}), {summary['model']}")
    if not (args.readme or args.png):
        print(table_markdown(summary, ceiling), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
