"""Answers from checkpoints, scored and compared: the evaluator of ``rlfuse eval`` and the demo.

    rlfuse eval --checkpoints base runs/x/sft runs/x/ppo --prompts heldout.jsonl
                (--reward-fn module:function | --reward-checkpoint runs/x/rm) [--out DIR]
                [--temperature T (default: greedy)] [--n-samples K] [--max-new-tokens N]

Every checkpoint answers the same prompts through the engine's own sampler
(``rollout.sample_completions``: argmax, or exactly softmax(logits / T) with each row keyed by
(seed, prompt index, sample index), so two checkpoints draw with the same keys), one model load
for all of them: each is loaded in turn into the ``policy`` adapter (``base``: the bare base
model). Each answer is scored as PPO scores it (``rollout.score``): the reward
function's value, the reward model's score in its training layout, and the log-ratio to the
reference, sum over the answer's tokens of log π(y) - log π_ref(y) (k1 on its own answers: the KL
to the reference when sampled).

Per checkpoint: accuracy (reward >= ``success``, Wilson 95% interval), mean reward ± SE, mean
reward-model score, KL to the reference, answer lengths. Per pair (A, B): the paired bootstrap
95% CI of the change in accuracy and mean reward (resampling prompts), McNemar's exact test on
the prompts exactly one of them got right (one answer per prompt), and B's win rate over A
under the reward model (ties count half). ``--out`` gets ``eval.json``, ``eval.md`` and
``answers.jsonl``.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from .backbone import POLICY, REFERENCE, REWARD, load_backbone
from .checkpoint import latest_checkpoint, load_into_backbone, write_json_atomic, write_text_atomic
from .rollout import call_reward_fn, load_reward_fn, sample_completions, score
from .stats import auc, mcnemar_exact, mean_se, paired_bootstrap_ci, wilson_interval
from .trained import find_checkpoint, run_config

BASE = "base"  # the bare base model, as a checkpoint name


@dataclass(frozen=True)
class Sampling:
    """How answers are drawn: greedy (``temperature`` None or 0) or pure sampling at T."""

    max_new_tokens: int = 64
    temperature: float | None = None
    n_samples: int = 1
    seed: int = 0
    batch_size: int = 32

    @property
    def greedy(self) -> bool:
        return not self.temperature

    def check(self) -> None:
        if self.temperature is not None and not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy), got {self.temperature}")
        for name in ("max_new_tokens", "n_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


# --------------------------------------------------------------------------- answering

def _unscored(prompts, completions):  # score's reward slot when only the KL is asked for
    return [0.0] * len(completions)


@torch.no_grad()
def answer(backbone, prompts, sampling: Sampling, *, reward_fn=None, reward_model: bool = False,
           kl: bool = True, success: float = 1.0, desc: str = "answer", progress: bool = True) -> list[dict]:
    """One row per (prompt, sample) from the backbone's ``policy`` adapter, in prompt order:
    {"index", "sample", "prompt", "completion", "n_tokens", "truncated"} plus, as asked,
    "reward" and "correct" (reward_fn), "rm_score" (the ``reward`` adapter + head) and
    "kl" (log-ratio to ``backbone.reference_adapter``, summed over the answer's tokens)."""
    from tqdm.auto import tqdm

    sampling.check()
    rows: list[dict] = []
    T = sampling.temperature or 1.0
    per = max(1, sampling.batch_size // sampling.n_samples)  # prompts per sampling call
    for start in tqdm(range(0, len(prompts), per), desc=desc, disable=not progress, dynamic_ncols=True):
        idx = list(range(start, min(start + per, len(prompts))))
        ro = sample_completions(backbone, [prompts[i] for i in idx], n_samples=sampling.n_samples,
                                max_new_tokens=sampling.max_new_tokens, temperature=T, seed=sampling.seed,
                                prompt_indices=idx, greedy=sampling.greedy)
        if kl or reward_model:
            ro = score(backbone, ro, temperature=T, reward_fn=None if reward_model else (reward_fn or _unscored),
                       values=None, batch_size=sampling.batch_size, with_policy=kl)
        rm_scores = ro.scores if reward_model else None
        rewards = (call_reward_fn(reward_fn, ro, device=ro.input_ids.device) if reward_fn is not None
                   else None)
        n_tok = ro.response_mask.sum(1)
        log_ratio = (ro.logp - ro.ref_logp).sum(1) if kl else None
        for r in range(len(ro)):
            row = {"index": idx[r // sampling.n_samples], "sample": r % sampling.n_samples, "prompt": ro.prompts[r],
                   "completion": ro.completions[r], "n_tokens": int(n_tok[r]), "truncated": bool(ro.truncated[r])}
            if rewards is not None:
                row["reward"] = float(rewards[r])
                row["correct"] = bool(rewards[r] >= success)
            if rm_scores is not None:
                row["rm_score"] = float(rm_scores[r])
            if log_ratio is not None:
                row["kl"] = float(log_ratio[r])
            rows.append(row)
    return rows


class Evaluator:
    """One backbone that answers as any checkpoint of one base model: each is loaded in turn
    into the ``policy`` adapter (the checkpoint loader ``checkpoint.load_into_backbone``);
    the reference (for the KL) sits in the ``sft`` adapter, the reward model in ``reward``."""

    def __init__(self, model_cfg, *, device: str = "auto", reference: str | None = BASE,
                 reward_checkpoint: str | None = None):
        adapters = [POLICY, REFERENCE] + ([REWARD] if reward_checkpoint else [])
        self.backbone = load_backbone(model_cfg, device=device, adapters=adapters)
        self.backbone.train(False)
        # a fresh LoRA adapter adds exactly 0 (its B matrices start at zero): the bare base model
        self._base_state = self.backbone.adapter_state_dict(POLICY)
        self.reference = self._load(REFERENCE, reference)
        self.backbone.reference_adapter = None if self.reference == BASE else REFERENCE
        self.reward_checkpoint = None
        if reward_checkpoint:
            ckpt = find_checkpoint(reward_checkpoint, "reward")
            self.reward_checkpoint = str(load_into_backbone(self.backbone, ckpt, REWARD,
                                                            {"reward_head": self.backbone.reward_head}))

    def _load(self, adapter: str, checkpoint: str | None) -> str:
        if checkpoint in (None, BASE):
            self.backbone.load_adapter_state_dict(adapter, self._base_state)
            return BASE
        return str(load_into_backbone(self.backbone, find_checkpoint(checkpoint, "policy"), adapter))

    def answer(self, checkpoint: str, prompts, sampling: Sampling, *, reward_fn=None, kl: bool = True,
               success: float = 1.0, progress: bool = True) -> tuple[str, list[dict]]:
        """(the checkpoint folder loaded, or "base"; its answer rows: see :func:`answer`)."""
        loaded = self._load(POLICY, checkpoint)
        rows = answer(self.backbone, prompts, sampling, reward_fn=reward_fn,
                      reward_model=self.reward_checkpoint is not None, kl=kl, success=success,
                      desc=f"eval {Path(str(checkpoint)).name}", progress=progress)
        return loaded, rows


# --------------------------------------------------------------------------- statistics

def _per_prompt(rows: list[dict], key: str) -> list[float]:
    """The mean of ``key`` over each prompt's samples, in prompt order."""
    by: dict[int, list[float]] = {}
    for r in rows:
        by.setdefault(r.get("index", len(by)), []).append(float(r[key]))
    return [sum(v) / len(v) for v in by.values()]


def summarize(rows: list[dict]) -> dict:
    """One checkpoint's answers in numbers (the keys its rows have)."""
    n = len(rows)
    out: dict = {"n": n, "prompts": len({r.get("index", i) for i, r in enumerate(rows)})}
    if n and "correct" in rows[0]:
        k = sum(r["correct"] for r in rows)
        out.update(correct=k, accuracy=k / n, accuracy_ci95=list(wilson_interval(k, n)))
        out["mean_reward"], out["mean_reward_se"] = mean_se([r["reward"] for r in rows])
    if n and "rm_score" in rows[0]:
        out["mean_rm_score"], out["mean_rm_score_se"] = mean_se([r["rm_score"] for r in rows])
        if "correct" in rows[0]:  # does the reward model tell right answers from wrong ones?
            out["rm_auc"] = auc([r["rm_score"] for r in rows], [r["correct"] for r in rows])
    if n and "kl" in rows[0]:
        out["kl_to_ref"], out["kl_to_ref_se"] = mean_se([r["kl"] for r in rows])
    if n and "n_tokens" in rows[0]:
        lengths = [r["n_tokens"] for r in rows]
        out["length"] = {"mean": sum(lengths) / n, "median": statistics.median(lengths), "max": max(lengths),
                         "truncated_frac": sum(r["truncated"] for r in rows) / n}
    return out


def compare(before: list[dict], after: list[dict], seed: int = 0) -> dict:
    """Paired comparison of two evaluations of the same prompts (``after`` minus ``before``):
    bootstrap CIs over prompts, McNemar on one answer per prompt, the reward model's win rate."""
    if [r["prompt"] for r in before] != [r["prompt"] for r in after]:
        raise ValueError("compare: the two evaluations must answer the same prompts in the same order")
    out: dict = {}
    if before and "correct" in before[0]:
        acc = paired_bootstrap_ci(_per_prompt(before, "correct"), _per_prompt(after, "correct"), seed=seed)
        rew = paired_bootstrap_ci(_per_prompt(before, "reward"), _per_prompt(after, "reward"), seed=seed + 1)
        out.update(accuracy_diff=acc[0], accuracy_diff_ci95=[acc[1], acc[2]],
                   reward_diff=rew[0], reward_diff_ci95=[rew[1], rew[2]])
        one_each = all(r.get("sample", 0) == 0 for r in before)
        gained, lost, p = mcnemar_exact([r["correct"] for r in before], [r["correct"] for r in after])
        out.update(prompts_gained=gained, prompts_lost=lost, mcnemar_p=p if one_each else None,
                   significant=bool(acc[1] > 0 or rew[1] > 0),  # an improvement beyond noise
                   significant_decrease=bool(acc[2] < 0 or rew[2] < 0))
    if before and "rm_score" in before[0]:
        wins = [float(b["rm_score"] > a["rm_score"]) + 0.5 * (b["rm_score"] == a["rm_score"])
                for a, b in zip(before, after)]
        out["rm_win_rate"] = sum(wins) / len(wins)
        d = paired_bootstrap_ci(_per_prompt(before, "rm_score"), _per_prompt(after, "rm_score"), seed=seed + 2)
        out.update(rm_score_diff=d[0], rm_score_diff_ci95=[d[1], d[2]])
    return out


def best_of_n(rows: list[dict]) -> dict:
    """Each prompt's samples, judged by the reward model: the accuracy of the answer it ranks
    first, against a random sample's (the mean) and the oracle's (any sample right)."""
    groups: dict[int, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["index"], []).append(r)
    picks = [max(g, key=lambda r: r["rm_score"]) for g in groups.values()]
    n = len(groups)
    k = sum(p["correct"] for p in picks)
    return {"prompts": n, "samples_per_prompt": max(len(g) for g in groups.values()) if groups else 0,
            "rm_pick_accuracy": k / n if n else float("nan"), "rm_pick_accuracy_ci95": list(wilson_interval(k, n)),
            "sample_accuracy": sum(r["correct"] for r in rows) / len(rows) if rows else float("nan"),
            "oracle_accuracy": sum(any(r["correct"] for r in g) for g in groups.values()) / n if n else float("nan")}


def report(names: list[str], evaluations: dict[str, list[dict]], seed: int = 0) -> dict:
    """Per-checkpoint summaries and every pair's comparison (later vs earlier in ``names``)."""
    return {"checkpoints": {name: summarize(evaluations[name]) for name in names},
            "pairs": {f"{b} vs {a}": compare(evaluations[a], evaluations[b], seed=seed)
                      for i, a in enumerate(names) for b in names[i + 1:]}}


# --------------------------------------------------------------------------- rendering

def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1%}"


def _num(x, spec: str = "+.3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def checkpoint_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the per-checkpoint table."""
    header = ["checkpoint", "n", "accuracy (95% CI)", "mean reward ± SE", "RM score", "KL to ref", "tokens"]
    rows = []
    for name, s in result["checkpoints"].items():
        acc = (f"{_pct(s['accuracy'])} [{_pct(s['accuracy_ci95'][0])}, {_pct(s['accuracy_ci95'][1])}]"
               if "accuracy" in s else "-")
        rew = f"{s['mean_reward']:.3f} ± {_num(s['mean_reward_se'], '.3f')}" if "mean_reward" in s else "-"
        length = s.get("length", {})
        rows.append([name, str(s["n"]), acc, rew, _num(s.get("mean_rm_score"), "+.2f"),
                     _num(s.get("kl_to_ref"), ".2f"), _num(length.get("mean"), ".1f")])
    return header, rows


def pair_lines(result: dict) -> list[str]:
    lines = []
    for name, c in result["pairs"].items():
        parts = []
        if "accuracy_diff" in c:
            verdict = ("improvement beyond noise" if c["significant"] else
                       "WORSE beyond noise" if c["significant_decrease"] else "no change beyond noise")
            p = f", McNemar exact p = {c['mcnemar_p']:.2g}" if c.get("mcnemar_p") is not None else ""
            parts.append(f"accuracy {c['accuracy_diff']:+.1%} (95% paired-bootstrap CI "
                         f"[{c['accuracy_diff_ci95'][0]:+.1%}, {c['accuracy_diff_ci95'][1]:+.1%}]), mean reward "
                         f"{c['reward_diff']:+.3f} (CI [{c['reward_diff_ci95'][0]:+.3f}, {c['reward_diff_ci95'][1]:+.3f}]); "
                         f"prompts gained/lost {c['prompts_gained']}/{c['prompts_lost']}{p} -> {verdict}")
        if "rm_win_rate" in c:
            parts.append(f"reward-model win rate {c['rm_win_rate']:.1%}")
        lines.append(f"{name}: " + "; ".join(parts))
    return lines


def render_markdown(result: dict, title: str | None = None) -> str:
    header, rows = checkpoint_table(result)
    md = ([f"### {title}", ""] if title else []) + ["| " + " | ".join(header) + " |",
                                                    "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(md + [""] + [f"- {line}" for line in pair_lines(result)]) + "\n"


def print_rich(result: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    header, rows = checkpoint_table(result)
    table = Table(title=title)
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    console = Console()
    console.print(table)
    for line in pair_lines(result):
        console.print(line, markup=False)


# --------------------------------------------------------------------------- the verb

def _reference_for(checkpoints: list[str], explicit: str | None) -> str:
    """``--reference``, else the SFT stage of the first checkpoint's run (PPO's reference), else base."""
    if explicit:
        return explicit
    for c in checkpoints:
        if c == BASE:
            continue
        ckpt = find_checkpoint(c, "policy")
        for run in (ckpt.parent.parent, Path(c)):
            if latest_checkpoint(run / "sft") is not None:
                return str(run / "sft")
    return BASE


def evaluate_checkpoints(checkpoints: list[str], prompts_path, *, reward_fn=None, reward_checkpoint=None,
                         reference: str | None = None, sampling: Sampling = Sampling(), success: float = 1.0,
                         device: str = "auto", overrides=None, labels: list[str] | None = None,
                         progress: bool = True) -> dict:
    """Every checkpoint's answers to the prompts of ``prompts_path``, scored and compared pairwise.
    Returns {"checkpoints", "pairs", "answers", "settings"}, keyed by ``labels`` (default: the
    checkpoints as named)."""
    from .data import load_prompts

    sampling.check()
    if len(checkpoints) < 1:
        raise ValueError("--checkpoints: name at least one checkpoint (or 'base')")
    labels = list(labels or checkpoints)
    if len(labels) != len(checkpoints):
        raise ValueError(f"evaluate_checkpoints: {len(labels)} labels for {len(checkpoints)} checkpoints")
    if len(set(checkpoints)) != len(checkpoints):
        raise ValueError(f"--checkpoints: a checkpoint is named twice ({checkpoints})")
    if reward_fn is None and reward_checkpoint is None:
        raise ValueError("rlfuse eval scores answers with --reward-fn MODULE:FUNCTION or --reward-checkpoint RM "
                         "(or both)")
    if isinstance(reward_fn, str):
        reward_fn = load_reward_fn(reward_fn)
    reference = _reference_for(checkpoints, reference)
    trained = [c for c in checkpoints if c != BASE] + [c for c in (reference,) if c != BASE]
    roles = [(c, "policy") for c in trained] + ([(reward_checkpoint, "reward")] if reward_checkpoint else [])
    if not roles:
        raise ValueError("--checkpoints: 'base' alone does not say which base model; name a trained checkpoint too")
    cfgs = [(c, run_config(find_checkpoint(c, role), overrides)) for c, role in roles]  # errors before the load
    cfg = cfgs[0][1]
    for c, other in cfgs[1:]:
        if other.model.name_or_path != cfg.model.name_or_path:
            raise ValueError(f"{c} was trained on {other.model.name_or_path}, {cfgs[0][0]} on "
                             f"{cfg.model.name_or_path}: compare checkpoints of one base model")
    from .backbone import load_tokenizer

    prompts = load_prompts(prompts_path, load_tokenizer(cfg.model), cfg.ppo.max_prompt_length)
    if not prompts:
        raise ValueError(f"{prompts_path}: no prompts")
    ev = Evaluator(cfg.model, device=device, reference=reference, reward_checkpoint=reward_checkpoint)
    answers, loaded = {}, {}
    for c, name in zip(checkpoints, labels):
        loaded[name], answers[name] = ev.answer(c, prompts, sampling, reward_fn=reward_fn, success=success,
                                                progress=progress)
    result = report(labels, answers, seed=sampling.seed)
    result["settings"] = {"prompts": str(prompts_path), "n_prompts": len(prompts), "loaded": loaded,
                          "reference": ev.reference, "reward_checkpoint": ev.reward_checkpoint,
                          "reward_fn": getattr(reward_fn, "__name__", None), "success_threshold": success,
                          "decoding": "greedy" if sampling.greedy else f"sampled at T={sampling.temperature}",
                          **{k: getattr(sampling, k) for k in ("max_new_tokens", "n_samples", "seed")}}
    result["answers"] = answers
    del ev  # the model: the caller's next stage may load its own
    return result


def write_result(result: dict, out, title: str) -> list[Path]:
    """``eval.json`` (everything but the answers), ``eval.md`` and ``answers.jsonl`` under ``out``."""
    import json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    body = {k: v for k, v in result.items() if k != "answers"}
    lines = [json.dumps({"checkpoint": name, **row}, ensure_ascii=False)
             for name, rows in result["answers"].items() for row in rows]
    return [write_json_atomic(out / "eval.json", body), write_text_atomic(out / "eval.md", render_markdown(body, title)),
            write_text_atomic(out / "answers.jsonl", "".join(line + "\n" for line in lines))]


def main(args) -> int:
    """The ``rlfuse eval`` verb (arguments parsed by engine/cli.py)."""
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        n_samples=args.n_samples, seed=args.seed, batch_size=args.batch_size)
    result = evaluate_checkpoints(args.checkpoints, args.prompts, reward_fn=args.reward_fn,
                                  reward_checkpoint=args.reward_checkpoint, reference=args.reference,
                                  sampling=sampling, success=args.success, device=args.device,
                                  overrides=args.overrides, progress=not args.no_progress)
    title = f"rlfuse eval: {result['settings']['n_prompts']} prompts, {result['settings']['decoding']}"
    print_rich(result, title)
    if args.out:
        for path in write_result(result, args.out, title):
            print(f"[rlfuse] wrote {path}")
    return 0
