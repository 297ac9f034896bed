"""The demo's recipe: the four steps of RLHF as public engine calls, stage by stage.

    0. base       the base model answers the held-out prompts (greedy), graded by the task
    1. SFT        ``train_sft`` on ideal answers, deliberately short (it teaches the format)
    2. annotate   the SFT policy samples K answers per prompt; the scripted annotator ranks them
    3. RM         ``train_reward`` on those rankings (+ synthetic near-miss pairs)
    4. PPO        ``train_ppo``: classic PPO (GAE + value head) against the LEARNED reward model
    5. evaluate   ``evaluate_checkpoints`` (``rlfuse eval``'s function): SFT and every saved PPO
                  checkpoint on the held-out prompts, scored by the grader and the reward model;
                  best-of-n under the reward model; then the report
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import latest_checkpoint
from ..config import RunConfig, apply_overrides, load_config, resolve_device
from ..data import load_prompts
from ..evaluate import BASE, Evaluator, Sampling, best_of_n, evaluate_checkpoints
from ..memory import release_memory
from ..metrics import MemoryPhases, RunLog
from ..ppo import train_ppo
from ..reward import train_reward
from ..sft import train_sft
from ..tasks import arithmetic
from . import report
from .task import Splits, make_splits, write_rankings, write_stage_data


@dataclass
class Demo:
    cfg: RunConfig
    run_dir: Path
    source_model: str
    s: Splits
    files: dict[str, Path]

    @property
    def heldout(self) -> list[str]:
        return self.s.heldout

    @property
    def splits(self) -> dict[str, list[str]]:  # the training prompts of each stage (disjoint)
        return {"sft": self.s.sft, "annotate": self.s.annotate, "synthetic": self.s.synthetic, "ppo": self.s.ppo}


def setup(args) -> Demo:
    """The preset (one YAML through the engine's config loader), the CLI's changes, the data files."""
    from . import packaged_model, prepare_run_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(f"demo-{args.preset}")
    model = args.model or (packaged_model(cfg.demo) if cfg.demo.model_package else cfg.model.name_or_path)
    run_dir = prepare_run_dir(args.out, args.preset, args.force)
    apply_overrides(cfg, {"run_dir": str(run_dir), "seed": args.seed, "device": args.device,
                          "model.name_or_path": model, "progress": not args.no_progress,
                          **({"demo.n_eval": args.n_eval} if args.n_eval else {}),
                          **({"ppo.advantage": args.advantage} if args.advantage else {})})
    from ..advantages import get_estimator

    if get_estimator(cfg.ppo.advantage).grouped:  # the same rollout rows, as groups to compare
        g = cfg.demo.group_samples
        apply_overrides(cfg, {"ppo.n_samples": g, "ppo.batch_size": max(1, cfg.ppo.batch_size // g)})
    apply_overrides(cfg, args.overrides)  # the user's --set last: it wins
    torch.manual_seed(cfg.seed)
    s = make_splits(cfg.demo, cfg.seed)
    files = write_stage_data(run_dir / "data", s, cfg.demo.system, cfg.demo.best_of_prompts)
    cfg.sft.data, cfg.ppo.prompts = str(files["sft"]), str(files["ppo"])
    print(f"[demo] model {model}\n[demo] run directory {run_dir}")
    return Demo(cfg, run_dir, model, s, files)


def run_demo(args) -> dict:
    started = {"wall": time.perf_counter(), "cpu": time.process_time(), "load": os.getloadavg()}
    demo = setup(args)
    cfg, d, run_dir = demo.cfg, demo.cfg.demo, demo.run_dir
    memory, log, timings = MemoryPhases(resolve_device(cfg.device)), RunLog(run_dir), {}
    greedy = Sampling(max_new_tokens=d.max_new_tokens, batch_size=d.eval_batch_size, seed=cfg.seed)
    sampled = Sampling(max_new_tokens=d.max_new_tokens, batch_size=d.eval_batch_size, seed=cfg.seed,
                       temperature=d.annotate_temperature, n_samples=d.annotate_samples)
    engine, answers, info = {}, {}, {}

    def stage(name: str, title: str):
        print(f"[demo] {name[0]}/5 {title}")
        return report.StageTimer(name, memory, log, timings)

    def answer_as(checkpoint, prompts_file, how, reward_checkpoint=None, **kw):
        ev = Evaluator(cfg.model, device=cfg.device, reward_checkpoint=reward_checkpoint)
        prompts = load_prompts(prompts_file, ev.backbone.tokenizer, cfg.ppo.max_prompt_length)
        rows = ev.answer(checkpoint, prompts, how, reward_fn=arithmetic.reward, kl=False,
                         progress=cfg.progress, **kw)[1]
        info.setdefault("model_loaded_rss_mb", report.rss_now())
        del ev
        release_memory()  # one model copy alive: the stage that follows loads its own
        return rows

    with stage("0_base", f"base model on {len(demo.heldout)} held-out prompts (greedy)"):
        answers["base"] = answer_as(BASE, demo.files["heldout"], greedy)

    with stage("1_sft", f"SFT on {len(demo.s.sft)} ideal answers, {cfg.sft.max_steps} steps x {cfg.sft.batch_size}: "
                        "deliberately short, so SFT teaches the answer FORMAT and leaves correctness to RL"):
        engine["sft"] = train_sft(cfg)

    with stage("2_annotate", f"{d.annotate_samples} answers x {len(demo.s.annotate)} prompts from the SFT policy, "
                             "ranked by the scripted annotator (correctness, ties allowed)"):
        rows = answer_as(run_dir / "sft", demo.files["annotate"], sampled)
        path, info["reward_model"] = write_rankings(run_dir / "data", rows, demo.s.synthetic, system=d.system,
                                                    seed=cfg.seed)
        cfg.rm.data = str(path)

    with stage("3_reward_model", f"reward model on {info['reward_model']['rankings']} rankings + "
                                 f"{info['reward_model']['synthetic_pairs']} synthetic pairs"):
        engine["rm"] = train_reward(cfg)

    with stage("4_ppo", f"PPO ({cfg.ppo.advantage}) against {cfg.ppo.reward_fn or 'the learned reward model'}, "
                        f"{cfg.ppo.max_steps} iterations x {cfg.ppo.batch_size} prompts x {cfg.ppo.n_samples}"):
        engine["ppo"] = train_ppo(cfg)

    print("[demo] 5/5 evaluate: SFT and each saved PPO checkpoint on the held-out prompts (rlfuse eval)")
    t = time.perf_counter()
    with memory("5_evaluate"):
        ppo_ckpts = sorted(p for p in (run_dir / "ppo").glob("ckpt-*") if p.is_dir())
        final = latest_checkpoint(run_dir / "ppo")
        names = ["sft"] + [f"ppo@{int(p.name[5:])}" for p in ppo_ckpts if p != final] + ["ppo"]
        result = evaluate_checkpoints([str(run_dir / "sft")] + [str(p) for p in ppo_ckpts if p != final] + [str(final)],
                                      demo.files["heldout"], reward_fn=arithmetic.reward,
                                      reward_checkpoint=str(run_dir / "rm"), reference=str(run_dir / "sft"),
                                      sampling=greedy, device=cfg.device, labels=names, progress=cfg.progress)
        release_memory()
        answers.update(result["answers"])
        if d.best_of:  # does the reward model pick right answers among the SFT policy's samples?
            info["best_of"] = best_of_n(answer_as(run_dir / "sft", demo.files["best_of"], Sampling(
                max_new_tokens=d.max_new_tokens, batch_size=d.eval_batch_size, seed=cfg.seed + 1,
                temperature=d.annotate_temperature, n_samples=d.best_of), reward_checkpoint=str(run_dir / "rm")))
    timings["5_evaluate"] = round(time.perf_counter() - t, 2)
    return report.write(demo, answers, result, engine, info, memory, timings, started)

