"""PPO on the shared backbone.

    for each iteration:
        rollout  = generate(policy adapter, KV cache)
        score    : old log-probs + values (one policy pass), reference log-probs, reward
        advantages: gae | grpo | rloo, with the KL penalty in the reward (k1) or in the loss
        for ppo_epochs: for minibatch: K.ppo_loss(...) -> backward -> step
        KL coefficient: fixed, or Ziegler's adaptive controller towards target_kl

The policy adapter starts as a copy of the SFT adapter (or as the zero LoRA update when
no SFT ran, the bare base then being the reference), so at step 0 policy == reference
and the KL is 0 up to rounding.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import rlfuse.kernels as K

from .advantages import ESTIMATORS, compute_advantages, kl_per_token
from .backbone import load_backbone, load_tokenizer
from .checkpoint import latest_checkpoint, load_heads, load_safetensors, resolve_checkpoint
from .config import PPOConfig, RunConfig
from .data import epoch_batches, load_prompts
from .metrics import peak_memory_mb, reset_peak_memory
from .optim import make_optimizer
from .rollout import RewardFn, generate_rollout, load_reward_fn, policy_outputs, score_rollout
from .stage import Stage

POLICY, REFERENCE, REWARD = "policy", "sft", "reward"


class KLController:
    """Fixed coefficient, or the adaptive one of Ziegler et al. (2019): nudge the
    coefficient so the per-sequence KL tracks ``target``, by at most 20% per horizon."""

    def __init__(self, coef: float, *, adaptive: bool = False, target: float = 6.0, horizon: int = 10000):
        self.coef, self.adaptive, self.target, self.horizon = coef, adaptive, target, horizon

    def update(self, kl: float, n_samples: int) -> None:
        if self.adaptive:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.coef *= 1.0 + error * n_samples / self.horizon


def _stage_checkpoint(explicit: str | None, run_dir: Path, stage: str) -> Path | None:
    if explicit:
        return resolve_checkpoint(explicit)
    return latest_checkpoint(run_dir / stage)


def build_ppo_backbone(cfg: RunConfig, device: str, *, use_reward_model: bool, tokenizer=None):
    """Backbone with the policy adapter (+ frozen sft / reward adapters) set up for PPO."""
    c = cfg.ppo
    sft_ckpt = _stage_checkpoint(c.sft_checkpoint, Path(cfg.run_dir), "sft")
    rm_ckpt = _stage_checkpoint(c.reward_checkpoint, Path(cfg.run_dir), "rm") if use_reward_model else None
    if use_reward_model and rm_ckpt is None:
        raise ValueError("PPO needs a reward: pass --reward-fn module:function, train a reward model first "
                         "(rlfuse rm) in this run dir, or set ppo.reward_checkpoint")
    adapters = [POLICY] + ([REFERENCE] if sft_ckpt else []) + ([REWARD] if rm_ckpt else [])
    backbone = load_backbone(cfg.model, device=device, adapters=adapters, tokenizer=tokenizer)
    if sft_ckpt is not None:  # reference = frozen SFT adapter; policy starts as its copy
        sft_state = load_safetensors(sft_ckpt / "adapter_model.safetensors")
        backbone.load_adapter_state_dict(REFERENCE, sft_state)
        backbone.load_adapter_state_dict(POLICY, sft_state)
        backbone.reference_adapter = REFERENCE
    else:  # peft initialises LoRA B to zero: the policy starts as the bare base, its reference
        backbone.reference_adapter = None
    if rm_ckpt is not None:
        backbone.load_adapter_state_dict(REWARD, load_safetensors(rm_ckpt / "adapter_model.safetensors"))
        heads = load_heads(rm_ckpt)
        backbone.reward_head.load_state_dict({k.split(".", 1)[1]: v for k, v in heads.items()
                                              if k.startswith("reward_head.")})
        backbone.reward_head.requires_grad_(False)
    backbone.set_trainable([POLICY])
    return backbone, {"sft_checkpoint": str(sft_ckpt) if sft_ckpt else None,
                      "reward_checkpoint": str(rm_ckpt) if rm_ckpt else None}


def ppo_update(backbone, optimizer, ro, advantages, returns, c: PPOConfig, kl_coef: float) -> dict:
    """ppo_epochs passes of shuffled minibatches through K.ppo_loss; mean of the stats."""
    critic = returns is not None
    params = [p for group in optimizer.param_groups for p in group["params"]]
    totals: dict[str, float] = {}
    n_updates = 0
    backbone.train()
    for _ in range(c.ppo_epochs):
        for idx in torch.randperm(len(ro)).split(max(1, c.minibatch_size)):
            idx = idx.to(ro.input_ids.device)
            with backbone.use(POLICY):
                logp, entropy, values = policy_outputs(backbone, ro.input_ids[idx], ro.attention_mask[idx],
                                                       ro.prompt_len, temperature=c.temperature, with_values=critic)
            loss, stats = K.ppo_loss(
                logp, ro.logp[idx], advantages[idx], ro.response_mask[idx],
                clip_eps=c.clip_eps, clip_eps_high=c.clip_eps_high, dual_clip=c.dual_clip,
                ref_logp=ro.ref_logp[idx], kl_coef=kl_coef if c.kl_in_loss else 0.0, kl_estimator=c.kl_estimator,
                entropy=entropy if c.entropy_coef > 0 else entropy.detach(), entropy_coef=c.entropy_coef,
                values=values, old_values=ro.values[idx] if critic else None,
                returns=returns[idx] if critic else None, value_clip=c.value_clip, value_coef=c.value_coef)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
            optimizer.step()
            for k, v in {**stats, "loss": loss.detach(), "grad_norm": grad_norm}.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            n_updates += 1
    return {k: v / max(1, n_updates) for k, v in totals.items()}


def train_ppo(cfg: RunConfig, *, reward_fn: RewardFn | None = None, callbacks=()) -> dict:
    c = cfg.ppo
    if c.advantage not in ESTIMATORS:
        raise ValueError(f"ppo.advantage: unknown estimator {c.advantage!r} (use one of {', '.join(ESTIMATORS)})")
    if c.advantage != "gae" and c.n_samples < 2:
        raise ValueError(f"ppo.advantage={c.advantage} compares samples of a prompt: set ppo.n_samples >= 2")
    if reward_fn is None and c.reward_fn:
        reward_fn = load_reward_fn(c.reward_fn)
    stage = Stage(cfg, "ppo", callbacks)
    critic = c.advantage == "gae"
    tok = load_tokenizer(cfg.model)
    prompts = load_prompts(c.prompts, tok, c.max_prompt_length)  # data errors before the model load
    backbone, sources = build_ppo_backbone(cfg, stage.device, use_reward_model=reward_fn is None, tokenizer=tok)

    params = backbone.adapter_parameters(POLICY) + (list(backbone.value_head.parameters()) if critic else [])
    optimizer = make_optimizer(params, lr=c.lr, weight_decay=c.weight_decay, device=stage.device,
                               kind=cfg.model.optimizer)
    kl_ctl = KLController(c.kl_coef, adaptive=c.adaptive_kl, target=c.target_kl, horizon=c.kl_horizon)
    stage.attach(backbone, POLICY, {"value_head": backbone.value_head} if critic else {}, optimizer)
    start, extra = stage.restore()
    if start >= c.max_steps:
        return stage.finished_summary()
    kl_ctl.coef = extra.get("kl_coef", kl_ctl.coef)

    metrics: dict = {}
    for step in stage.progress(start, c.max_steps):
        t0 = time.perf_counter()
        reset_peak_memory(stage.device)
        batch = [prompts[i] for i in epoch_batches(len(prompts), c.batch_size, cfg.seed, step)]

        # 1. rollout and scoring (no grad)
        ro = generate_rollout(backbone, batch, n_samples=c.n_samples, max_new_tokens=c.max_new_tokens,
                              temperature=c.temperature)
        score_rollout(backbone, ro, temperature=c.temperature, reward_fn=reward_fn, with_values=critic,
                      batch_size=c.score_batch_size)
        t_rollout = time.perf_counter() - t0

        # 2. advantages
        advantages, returns = compute_advantages(ro, estimator=c.advantage, n_samples=c.n_samples,
                                                 kl_coef=kl_ctl.coef, kl_in_loss=c.kl_in_loss, gamma=c.gamma,
                                                 lam=c.lam, whiten=c.whiten_advantages)

        # 3. PPO epochs over minibatches
        stats = ppo_update(backbone, optimizer, ro, advantages, returns, c, kl_ctl.coef)

        # 4. KL control and logging (the KL of the rollout, measured before this update)
        mask = ro.response_mask
        seq_kl = kl_per_token(ro.logp, ro.ref_logp, mask).sum(1).mean().item()
        coef_used = kl_ctl.coef
        kl_ctl.update(seq_kl, len(ro))
        n_tokens = int(mask.sum())
        dt = time.perf_counter() - t0
        metrics = {
            "reward": ro.scores.mean().item(), "reward_std": ro.scores.std().item() if len(ro) > 1 else 0.0,
            "kl": seq_kl, "kl_per_token": seq_kl * len(ro) / max(1, n_tokens), "kl_coef": coef_used,
            "entropy": ((ro.entropy * mask).sum() / mask.sum()).item(),
            "clipfrac": stats.get("clipfrac"), "approx_kl": stats.get("approx_kl"),
            "policy_loss": stats.get("policy_loss"), "value_loss": stats.get("value_loss"),
            "loss": stats.get("loss"), "grad_norm": stats.get("grad_norm"),
            "response_length": n_tokens / len(ro), "tokens_per_s": n_tokens / dt,
            "rollout_time_s": t_rollout, "step_time_s": dt, "peak_mem_mb": peak_memory_mb(stage.device)}
        if step == 0 or (step + 1) % max(1, cfg.sample_every) == 0:
            stage.log.samples([{"stage": "ppo", "step": step + 1, "prompt": p, "completion": t, "score": float(s)}
                               for p, t, s in list(zip(ro.prompts, ro.completions, ro.scores))[:4]])
        stage.end_step(step + 1, c.max_steps, metrics, extra={"kl_coef": kl_ctl.coef})
    return stage.finish({"steps": c.max_steps, "final_reward": metrics.get("reward"),
                         "final_kl": metrics.get("kl"), "kl_coef": kl_ctl.coef, **sources,
                         "reward_source": c.reward_fn or ("python function" if reward_fn else "reward model"),
                         "runtime_s": time.time() - stage.started})
