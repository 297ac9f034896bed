"""PPO on the shared backbone. Each iteration is a chain of frozen values (``step_values.py``):

    Sampled     = sample_completions(policy adapter, KV cache)
    Scored      = score(...): old log-probs + values (one policy pass, or the `value` adapter's own
                  pass with ppo.critic=adapter), reference log-probs, raw reward
                  [dynamic sampling: groups of equal rewards swapped for fresh prompts]
    UpdateBatch = make_update_batch(...): reward normalised (reward_norm), missing-EOS penalty,
                  clipped (reward_scale.py); the KL placed (k1 penalty in the reward, or a loss
                  term); advantages gae | grpo | rloo
    ppo_update  : plan_update's minibatches of micro-batches -> K.ppo_loss -> backward under each
                  forward's adapter (AdapterTape) -> one gradient_step per minibatch
    KL coefficient: fixed, or Ziegler's adaptive controller towards target_kl

The policy adapter starts as a copy of the SFT adapter (or as the zero LoRA update when
no SFT ran, the bare base then being the reference), so at step 0 policy == reference
and the KL is 0 up to rounding. Every dropout of the model is off (disable_dropout), so the
first minibatch of an update starts at ratio 1.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import rlfuse.kernels as K
from rlfuse.kernels.ppo_options import KL_ESTIMATORS, LOSS_AGGS

from .advantages import get_estimator, kl_per_token
from .backbone import POLICY, REFERENCE, REWARD, VALUE, load_backbone, load_tokenizer
from .checkpoint import latest_checkpoint, load_into_backbone, resolve_checkpoint
from . import distributed as D
from .config import PPOConfig, RunConfig
from .data import end_of_turn_id, epoch_batches, load_prompts
from .metrics import MemoryPhases
from .optim import gradient_step, make_optimizer
from .loss_options import loss_options
from .reward_scale import REWARD_NORMS, RewardScaler, load_or_calibrate
from .rollout import (RewardFn, concat_rollouts, critic_values, load_reward_fn, policy_outputs, reward_layout,
                      sample_completions, score, select_rows)
from .stage import Stage
from .step_values import Scored, UpdateBatch, make_update_batch
from .update_plan import check_micro_batch_size, micro_batches, plan_update, reuses_forward  # noqa: F401 (micro_batches: public)

CRITICS = ("shared", "adapter")
VALUE_INITS = ("zero", "reward")
# The kernel's own tables (one home: kernels/ppo_options.py). In-loss KL estimators and the
# divergence whose gradient each one follows on samples of pi: k2 = (log pi - log ref)^2 / 2 and
# the "+" variants follow KL(pi||ref), the RLHF objective's; k3 = ref/pi - 1 - log(ref/pi)
# (DeepSeekMath) follows KL(ref||pi); k1's expected gradient is 0, so it is a reward penalty only.
IN_LOSS_KL = tuple(k for k in KL_ESTIMATORS if k != "k1")
CALIBRATION_PROMPTS = 64  # prompts sampled (n_samples each) to calibrate a reward model's scale


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


def resolve_loss_options(c: PPOConfig) -> PPOConfig:
    """A copy of ``c`` with kl_in_loss / kl_estimator / loss_agg checked and their "auto" resolved
    from the estimator's traits (advantages.REGISTRY): grpo puts the KL in the loss (DeepSeekMath)
    with k3+ (k3's value, k2's gradient: that of KL(pi||ref)); gae and rloo keep Ziegler's k1
    penalty in the reward. grpo averages each sequence's token mean (DeepSeekMath), gae/rloo
    every token of the batch (token-mean)."""
    estimator = get_estimator(c.advantage)
    kl_in_loss = estimator.kl_in_loss if c.kl_in_loss is None else bool(c.kl_in_loss)
    est = c.kl_estimator
    if est not in ("auto", "k1") + IN_LOSS_KL:
        raise ValueError(f"ppo.kl_estimator: unknown value {est!r} (use auto, k1 (reward penalty only), "
                         f"{', '.join(IN_LOSS_KL)})")
    if est == "auto":  # k3+: k3's value (unbiased, >= 0) with k2's gradient
        est = "k3+" if kl_in_loss else "k1"
    if kl_in_loss and est == "k1":
        raise ValueError("ppo.kl_estimator=k1 with ppo.kl_in_loss=true: k1's expected gradient is zero, so the KL "
                         "would not constrain the policy; use k2, k3, k1+ or k3+, or kl_in_loss=false")
    agg = c.loss_agg
    if agg not in ("auto",) + LOSS_AGGS:
        raise ValueError(f"ppo.loss_agg: unknown value {agg!r} (use auto, {', '.join(LOSS_AGGS)})")
    if agg == "auto":
        agg = estimator.loss_agg
    c = dataclasses.replace(c, kl_in_loss=kl_in_loss, kl_estimator=est, loss_agg=agg)
    loss_options(c)  # the kernel's validation of its options, the one rule (e.g. clip_eps_high >= 0)
    return c


def resolve_ppo_config(c: PPOConfig, *, use_reward_model: bool) -> PPOConfig:
    """Check every PPO key up front (one-line errors naming the key) and resolve the "auto"s."""
    est = get_estimator(c.advantage)
    if est.grouped and c.n_samples < 2:
        raise ValueError(f"ppo.advantage={c.advantage} compares samples of a prompt: set ppo.n_samples >= 2")
    if c.scale_rewards != "group" and not est.scales_rewards:
        raise ValueError(f"ppo.scale_rewards={c.scale_rewards}: ppo.advantage={c.advantage} does not scale rewards "
                         "(keep group)")
    c = resolve_loss_options(c)
    if c.critic not in CRITICS:
        raise ValueError(f"ppo.critic: unknown value {c.critic!r} (use {' or '.join(CRITICS)})")
    value_init = c.value_init
    if value_init not in ("auto",) + VALUE_INITS:
        raise ValueError(f"ppo.value_init: unknown value {value_init!r} (use auto, {', '.join(VALUE_INITS)})")
    if value_init == "auto":  # the reward adapter+head is a full critic start only when the critic has its own adapter
        value_init = "reward" if use_reward_model and c.critic == "adapter" else "zero"
    if value_init == "reward" and not use_reward_model:
        raise ValueError("ppo.value_init=reward needs a reward model (this run scores with a Python reward_fn)")
    if c.value_lr is not None and not c.value_lr > 0:
        raise ValueError(f"ppo.value_lr must be > 0 (or null for ppo.lr), got {c.value_lr}")
    if c.critic_warmup_steps < 0:
        raise ValueError(f"ppo.critic_warmup_steps must be >= 0, got {c.critic_warmup_steps}")
    if c.dynamic_sampling and not est.grouped:
        raise ValueError(f"ppo.dynamic_sampling drops groups of equal rewards: ppo.advantage={c.advantage} "
                         "has no groups (use grpo or rloo)")
    if c.critic_warmup_steps and not est.needs_critic:
        raise ValueError(f"ppo.critic_warmup_steps: ppo.advantage={c.advantage} has no critic to warm up")
    norm = c.reward_norm
    if norm not in ("auto",) + REWARD_NORMS:
        raise ValueError(f"ppo.reward_norm: unknown value {norm!r} (use auto, {', '.join(REWARD_NORMS)})")
    if norm == "auto":  # a reward model's scale is arbitrary; a Python reward function's is meant
        norm = "calibrated" if use_reward_model else "none"
    if norm == "calibrated" and not use_reward_model:
        raise ValueError("ppo.reward_norm=calibrated needs a reward model; use running or none with a reward_fn")
    if c.reward_clip is not None and not c.reward_clip > 0:
        raise ValueError(f"ppo.reward_clip must be > 0 (or null for no clip), got {c.reward_clip}")
    if c.missing_eos_penalty is not None and not c.missing_eos_penalty >= 0:
        raise ValueError(f"ppo.missing_eos_penalty must be >= 0 (or null for none), got {c.missing_eos_penalty}")
    return dataclasses.replace(c, value_init=value_init, reward_norm=norm)


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere (as TRL does for RL): every nn.Dropout (LoRA's included) and
    every float ``*dropout*`` / ``*pdrop`` attribute of modules and configs, which attention
    implementations read directly. Old log-probs are scored without dropout, so an update
    forward with it would start at a ratio != 1 and clip noise instead of policy change."""
    configs = []
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        config = getattr(module, "config", None)
        if config is not None and not isinstance(config, dict) and all(config is not c for c in configs):
            configs.append(config)
        _zero_dropout_attrs(module)
    for config in configs:
        _zero_dropout_attrs(config)
        text_config = getattr(config, "text_config", None)
        if text_config is not None and not isinstance(text_config, dict):
            _zero_dropout_attrs(text_config)


def _zero_dropout_attrs(obj) -> None:
    for name, value in list(vars(obj).items()):
        if isinstance(value, float) and value > 0 and ("dropout" in name or "pdrop" in name):
            setattr(obj, name, 0.0)


class AdapterState:
    """A second trained adapter seen as a head by ``Stage``: it is saved in heads.safetensors
    (keys ``<name>.<peft key>``) and restored with the rest, so resume needs no extra file."""

    def __init__(self, backbone, adapter: str):
        self.backbone, self.adapter = backbone, adapter

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.backbone.adapter_state_dict(self.adapter)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.backbone.load_adapter_state_dict(self.adapter, state)


def build_ppo_backbone(cfg: RunConfig, device: str, *, use_reward_model: bool, tokenizer=None):
    """Backbone with the policy adapter (+ frozen sft / reward adapters, + the ``value`` adapter
    of an adapter critic) set up for PPO, every dropout off."""
    c = resolve_ppo_config(cfg.ppo, use_reward_model=use_reward_model)
    value_adapter = get_estimator(c.advantage).needs_critic and c.critic == "adapter"
    sft_ckpt = _stage_checkpoint(c.sft_checkpoint, Path(cfg.run_dir), "sft")
    rm_ckpt = _stage_checkpoint(c.reward_checkpoint, Path(cfg.run_dir), "rm") if use_reward_model else None
    if use_reward_model and rm_ckpt is None:
        raise ValueError("PPO needs a reward: pass --reward-fn module:function, train a reward model first "
                         "(rlfuse rm) in this run dir, or set ppo.reward_checkpoint")
    adapters = ([POLICY] + ([REFERENCE] if sft_ckpt else []) + ([REWARD] if rm_ckpt else [])
                + ([VALUE] if value_adapter else []))
    backbone = load_backbone(cfg.model, device=device, adapters=adapters, tokenizer=tokenizer)
    backbone.share_prompts = c.n_samples > 1  # one forward rule for scoring and every micro-batch (issue 22)
    if sft_ckpt is not None:  # reference = frozen SFT adapter; policy starts as its copy
        load_into_backbone(backbone, sft_ckpt, REFERENCE)
        load_into_backbone(backbone, sft_ckpt, POLICY)
        backbone.reference_adapter = REFERENCE
    else:  # peft initialises LoRA B to zero: the policy starts as the bare base, its reference
        backbone.reference_adapter = None
    if rm_ckpt is not None:
        load_into_backbone(backbone, rm_ckpt, REWARD, {"reward_head": backbone.reward_head})
        backbone.reward_head.requires_grad_(False)
    # critic start: zero head (values 0 until it learns), or the reward model as it is (OpenRLHF)
    if c.value_init == "reward":
        backbone.value_head.load_state_dict(backbone.reward_head.state_dict())
    else:
        backbone.value_head.zero_()
    if value_adapter:  # from the reward adapter, else from the policy's start (the SFT adapter)
        backbone.copy_adapter(REWARD if c.value_init == "reward" else POLICY, VALUE)
    backbone.value_head.requires_grad_(True)
    disable_dropout(backbone.model)
    backbone.set_trainable([POLICY] + ([VALUE] if value_adapter else []))
    return backbone, {"sft_checkpoint": str(sft_ckpt) if sft_ckpt else None,
                      "reward_checkpoint": str(rm_ckpt) if rm_ckpt else None}


class AdapterTape:
    """Forwards of one micro-batch, each under its adapter, and their backward under the same one.

    With gradient checkpointing, backward recomputes each layer, and peft's LoRA layers read the
    adapter active at THAT moment: a critic forward under ``value`` whose backward ran under
    ``policy`` got the policy's LoRA in its recompute and wrong gradients. So every forward's
    outputs are cut from the loss at detached leaves; ``backward`` runs the loss's own graph (no
    model in it), then each forward's graph under the adapter it ran with."""

    def __init__(self, backbone):
        self.backbone, self.graphs = backbone, []

    def forward(self, adapter, fn, *args, **kwargs):
        with self.backbone.use(adapter):
            out = fn(*args, **kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        leaves = tuple(o.detach().requires_grad_(o.requires_grad) if o is not None else None for o in outs)
        self.graphs.append((adapter, outs, leaves))
        return leaves if isinstance(out, tuple) else leaves[0]

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()  # as far as the leaves: K.ppo_loss's graph only
        for adapter, outs, leaves in self.graphs:
            pairs = [(o, leaf.grad) for o, leaf in zip(outs, leaves)
                     if o is not None and o.requires_grad and leaf.grad is not None]
            if pairs:
                with self.backbone.use(adapter):
                    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        self.graphs.clear()


@dataclass(frozen=True)
class UpdateResult:
    stats: dict                          # means over this update's gradient steps
    old_logp: torch.Tensor | None = None  # [B, R] from the update's forward, when it gave the old log-probs
    entropy: torch.Tensor | None = None


def _micro_batch_loss(backbone, batch: UpdateBatch, rows, c: PPOConfig, options, *, reuse_forward: bool):
    """(AdapterTape holding this micro-batch's forwards, its K.ppo_loss, its stats, the forward's
    detached log-probs and entropies)."""
    critic = batch.returns is not None
    own_critic = critic and c.critic == "adapter"
    tape = AdapterTape(backbone)
    ids, attn, mask = batch.input_ids[rows], batch.attention_mask[rows], batch.response_mask[rows]
    logp, entropy, values = tape.forward(POLICY, policy_outputs, backbone, ids, attn, batch.prompt_len,
                                         temperature=c.temperature, with_values=critic and not own_critic)
    if own_critic:  # one more forward (and backward) through the value adapter
        values = tape.forward(VALUE, critic_values, backbone, ids, attn, batch.prompt_len)
    seen_logp = logp.detach() * mask
    old_logp = seen_logp if reuse_forward else batch.logp[rows]  # reused: this forward is the old policy
    loss, stats = K.ppo_loss(
        logp, old_logp, batch.advantages[rows], mask, ref_logp=batch.ref_logp[rows],
        entropy=entropy if c.entropy_coef > 0 else entropy.detach(),
        values=values, old_values=batch.values[rows] if critic else None,
        returns=batch.returns[rows] if critic else None, **dataclasses.asdict(options))
    return tape, loss, stats, seen_logp, entropy.detach() * mask


def ppo_update(backbone, optimizer, batch: UpdateBatch, c: PPOConfig, *, policy_frozen: bool = False,
               on_minibatch=None, check_update=None, shuffle_seed: int = 0) -> UpdateResult:
    """ppo_epochs passes of shuffled minibatches of ``batch`` through K.ppo_loss; mean of the stats.

    The rows and weights of every minibatch and micro-batch come from ``plan_update``; each
    micro-batch runs its forwards and backward (``AdapterTape``), each minibatch ends in one
    ``gradient_step``. ``batch.returns`` None: no critic. ``policy_frozen`` (critic warm-up): the
    policy adapter's gradients are dropped, so only the critic moves. ``on_minibatch(epoch, index,
    stats)`` sees each minibatch's stats. ``batch`` is not changed: the log-probs of a reused
    forward come back in the result."""
    check_micro_batch_size(c.micro_batch_size)
    c = resolve_loss_options(c)
    options = loss_options(c, kl_coef=batch.loss_kl_coef)
    plan = plan_update(batch.response_mask, c, critic=batch.returns is not None, scored_policy=batch.logp is not None,
                       shuffle_seed=shuffle_seed, fsdp=bool(D.fsdp_units(backbone)))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    frozen = backbone.adapter_parameters(POLICY) if policy_frozen else []
    seen = (torch.zeros_like(batch.response_mask), torch.zeros_like(batch.response_mask))
    steps = []
    backbone.train()
    for mb in plan.minibatches:
        optimizer.zero_grad(set_to_none=True)
        loss, stats = torch.zeros(()), {}
        for micro in mb.micro_batches:
            tape, m_loss, m_stats, *forward = _micro_batch_loss(backbone, batch, micro.rows, c, options,
                                                                reuse_forward=plan.reuse_forward)
            tape.backward(m_loss * micro.loss_weight)
            del tape  # free this micro-batch's graphs before the next forward
            for kept, new in zip(seen, forward):
                kept[micro.rows] = new
            loss = loss + m_loss.detach() * micro.loss_share
            for k, v in m_stats.items():  # token means: weighted by the micro-batch's share of the tokens
                stats[k] = v if len(mb.micro_batches) == 1 else stats.get(k, 0.0) + v.detach() * micro.token_share
        grad_norm, stepped = gradient_step(optimizer, params, loss if mb.contributes else torch.zeros(()),
                                           max_grad_norm=c.max_grad_norm, check_update=check_update, drop=frozen)
        if not stepped:
            continue  # nonfinite=skip: this minibatch's update is dropped (on every rank: same grad norm)
        step_stats = {**stats, "loss": loss, "grad_norm": grad_norm} if mb.contributes else {}
        step_stats = _global_stats(step_stats, mb)
        if on_minibatch is not None and mb.contributes:
            on_minibatch(mb.epoch, mb.index, step_stats)
        steps.append(step_stats)
    means = {k: sum(s.get(k, 0.0) for s in steps) / max(1, len(steps)) for k in {k for s in steps for k in s}}
    return UpdateResult(means, *(seen if plan.reuse_forward else (None, None)))


def _global_stats(stats: dict, mb) -> dict[str, float]:
    """A minibatch's stats as floats; under torchrun the global token means (a rank without rows
    adds weight 0 and takes the others')."""
    stats = {k: float(v) for k, v in stats.items()}
    if D.world().distributed:
        stats = D.reduce_metrics(stats, weight=mb.weight if mb.contributes else 0.0)
    return stats


@torch.no_grad()
def sample_reward_scores(backbone, prompts, c: PPOConfig, seed: int) -> torch.Tensor:
    """Reward-model scores of the policy's samples (the SFT policy, at step 0) on up to
    CALIBRATION_PROMPTS prompts, under a forked RNG so the run's own sampling is unchanged."""
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))[:CALIBRATION_PROMPTS]
    was_training = backbone.model.training
    backbone.train(False)
    scores = []
    with torch.random.fork_rng(devices=[backbone.device] if backbone.device.type == "cuda" else []):
        torch.manual_seed(seed)
        for chunk in order.split(max(1, c.batch_size)):
            ro = sample_completions(backbone, [prompts[int(j)] for j in chunk], n_samples=c.n_samples,
                                  max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                                  seed=seed, iteration=-1, prompt_indices=chunk.tolist())  # -1: not a PPO step
            ids, attn = reward_layout(ro.input_ids, ro.attention_mask, ro.response_mask, ro.prompt_len,
                                      backbone.eos_token_ids(), end_of_turn_id(backbone.tokenizer),
                                      backbone.tokenizer.pad_token_id)
            scores.append(backbone.reward_scores(ids, attn).float())
    backbone.train(was_training)
    return torch.cat(scores)


def informative_groups(scores: torch.Tensor, n_samples: int) -> list[int]:
    """Indices of the groups (n_samples adjacent rows) whose scores are not all equal."""
    g = scores.detach().view(-1, n_samples)
    return torch.nonzero((g != g[:, :1]).any(1)).flatten().tolist()


def refill_informative_groups(ro, sample_and_score, n_prompts: int, c: PPOConfig, seed: int, step: int,
                              pad_id: int):
    """DAPO's dynamic sampling: drop the groups of ``ro`` whose raw rewards are all equal (their
    advantages are 0: they teach nothing) and sample fresh prompts, keyed by the round, until
    this rank has as many informative groups as it sampled at first or ``c.max_sampling_rounds``
    samplings are done. Every rank runs as many rounds as the neediest one (forwards are
    collectives under FSDP2). A rank that found none keeps its first batch as it was (advantages
    0; the KL term still acts). Returns (rollout, metrics)."""
    G = c.n_samples
    target = len(ro) // G
    kept, n_sampled, n_informative, rounds = [], 0, 0, 1
    part = ro
    while True:
        good = informative_groups(part.scores, G)
        n_sampled, n_informative = n_sampled + len(part) // G, n_informative + len(good)
        have = sum(len(r) // G for r in kept)
        take = good[:max(0, target - have)]
        if take:
            kept.append(select_rows(part, [g * G + j for g in take for j in range(G)]))
        short = target - have - len(take)
        if rounds >= c.max_sampling_rounds or D.global_count(int(short > 0)) == 0:
            break
        # the next round's prompts: a fresh draw of the global batch, one per round, then this rank's block
        indices = D.shard(epoch_batches(n_prompts, c.batch_size, seed + 1_000_003 * rounds, step))
        part = sample_and_score(indices, sampling_round=rounds)
        rounds += 1
    out = concat_rollouts(kept, pad_id) if kept else ro
    metrics = {"sampling_rounds": rounds,
               "informative_frac": D.global_count(n_informative) / max(1.0, D.global_count(n_sampled)),
               "kept_groups": D.global_count(len(out) // G if kept else 0)}
    return out, metrics


def _gathered_call(backbone, fn, *args):
    with D.gathered(backbone):
        return fn(*args)


def train_ppo(cfg: RunConfig, *, reward_fn: RewardFn | None = None, callbacks=(), on_minibatch=None) -> dict:
    """``on_minibatch(epoch, index, stats)`` is called after each gradient step (see ppo_update)."""
    if reward_fn is None and cfg.ppo.reward_fn:
        reward_fn = load_reward_fn(cfg.ppo.reward_fn)
    c = resolve_ppo_config(cfg.ppo, use_reward_model=reward_fn is None)  # every key checked before the model load
    stage = Stage(cfg, "ppo", callbacks)
    critic = get_estimator(c.advantage).needs_critic
    own_critic = critic and c.critic == "adapter"
    tok = load_tokenizer(cfg.model)
    prompts = load_prompts(c.prompts, tok, c.max_prompt_length)  # data errors before the model load
    backbone, sources = build_ppo_backbone(cfg, stage.device, use_reward_model=reward_fn is None, tokenizer=tok)
    D.prepare(backbone, cfg.distributed.strategy)  # FSDP2 sharding, before the optimizer sees the params

    groups = [{"params": backbone.adapter_parameters(POLICY)}]
    if critic:  # the critic's own learning rate (with critic=shared the value loss also trains the policy adapter)
        groups.append({"params": list(backbone.value_head.parameters())
                       + (backbone.adapter_parameters(VALUE) if own_critic else []), "lr": c.value_lr or c.lr})
    optimizer = make_optimizer(groups, lr=c.lr, weight_decay=c.weight_decay, eps=c.adam_eps, device=stage.device,
                               kind=cfg.model.optimizer)
    kl_ctl = KLController(c.kl_coef, adaptive=c.adaptive_kl, target=c.target_kl, horizon=c.kl_horizon)
    scaler = RewardScaler(c.reward_norm, clip=c.reward_clip, missing_eos_penalty=c.missing_eos_penalty)
    if c.reward_norm == "calibrated":  # before restore: the policy is still the SFT policy here
        calibration = load_or_calibrate(
            sources["reward_checkpoint"], lambda: _gathered_call(backbone, sample_reward_scores, backbone, prompts, c, cfg.seed),
            info={"sft_checkpoint": sources["sft_checkpoint"], "max_new_tokens": c.max_new_tokens,
                  "temperature": c.temperature, "n_samples": c.n_samples})
        scaler.mean, scaler.std = float(calibration["mean"]), float(calibration["std"])
    heads = {"value_head": backbone.value_head} if critic else {}
    if own_critic:
        heads["value_adapter"] = AdapterState(backbone, VALUE)
    stage.attach(backbone, POLICY, heads, optimizer)
    start, extra = stage.restore()
    if start >= c.max_steps:
        return stage.finished_summary()
    kl_ctl.coef = extra.get("kl_coef", kl_ctl.coef)
    if "reward_moments" in extra:
        scaler.moments.load_state_dict(extra["reward_moments"])

    metrics: dict = {}
    for step in stage.progress(start, c.max_steps):
        t0 = time.perf_counter()
        phases = MemoryPhases(stage.device)  # peak memory of generation, scoring and update
        # c.batch_size is global: each data-parallel rank samples and scores a block of whole prompts
        # (so GRPO/RLOO groups stay on one rank), keyed by their dataset index for reproducible samples
        batch_idx = D.shard(epoch_batches(len(prompts), c.batch_size, cfg.seed, step))
        batch = [prompts[i] for i in batch_idx]
        n_rows = int(D.global_count(len(batch) * c.n_samples))  # rows of the global rollout

        # 1. rollout and scoring (no grad): Sampled -> Scored
        def sample_and_score(indices, sampling_round=0) -> Scored:
            with phases("generation"):
                sampled = sample_completions(backbone, [prompts[i] for i in indices], n_samples=c.n_samples,
                                             max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                                             seed=cfg.seed, iteration=step, prompt_indices=indices,  # reproducible keys
                                             sampling_round=sampling_round)
            with phases("scoring"):
                # one optimisation pass over one minibatch, no critic, KL not in the reward: the update's
                # forward gives the old log-probs, so scoring skips its policy pass (see update_plan)
                return score(backbone, sampled, temperature=c.temperature, reward_fn=reward_fn,
                             values=("adapter" if own_critic else "policy") if critic else None,
                             batch_size=c.score_batch_size,
                             with_policy=not reuses_forward(c, n_rows, critic=critic))

        with D.gathered(backbone):  # FSDP2: weights gathered once for the many rollout forwards
            scored = sample_and_score(batch_idx)
            sampling = {}
            if c.dynamic_sampling:
                scored, sampling = refill_informative_groups(scored, sample_and_score, len(prompts), c, cfg.seed,
                                                             step, backbone.tokenizer.pad_token_id)
        t_rollout = time.perf_counter() - t0

        # 2. Scored -> UpdateBatch: scaled scores (normalise -> missing-EOS penalty -> clip, before KL
        # shaping), the KL's place, advantages
        batch = make_update_batch(scored, c, scaler=scaler, kl_coef=kl_ctl.coef)

        # 3. PPO epochs over minibatches
        with phases("update"):
            result = ppo_update(backbone, optimizer, batch, c, check_update=stage.check_update,
                                policy_frozen=step < c.critic_warmup_steps, on_minibatch=on_minibatch,
                                shuffle_seed=cfg.seed * 100_003 + step)
        stats = result.stats
        old_logp, entropy = ((batch.logp, batch.entropy) if batch.logp is not None
                             else (result.old_logp, result.entropy))

        # 4. KL control and logging (the KL of the rollout, measured before this update)
        mask = batch.response_mask
        seq_kl = D.mean_std(kl_per_token(old_logp, batch.ref_logp, mask).sum(1))[0]  # global batch means
        coef_used = kl_ctl.coef
        kl_ctl.update(seq_kl, n_rows)
        n_tokens = int(D.global_count(int(mask.sum())))
        reward_mean, reward_std, _ = D.mean_std(batch.raw_scores)
        dt = time.perf_counter() - t0
        metrics = {
            "reward": reward_mean, "reward_std": reward_std,
            "reward_scaled": D.mean_std(batch.scores)[0], "truncated_frac": D.mean_std(batch.truncated.float())[0],
            "kl": seq_kl, "kl_per_token": seq_kl * n_rows / max(1, n_tokens), "kl_coef": coef_used,
            "entropy": D.global_count((entropy * mask).sum().item()) / max(1, n_tokens),
            "clipfrac": stats.get("clipfrac"), "approx_kl": stats.get("approx_kl"),
            "policy_loss": stats.get("policy_loss"), "value_loss": stats.get("value_loss"),
            "loss": stats.get("loss"), "grad_norm": stats.get("grad_norm"),
            "response_length": n_tokens / n_rows, "tokens_per_s": n_tokens / dt,
            "rollout_time_s": t_rollout, "step_time_s": dt, "peak_mem_mb": max(phases.peak_mb.values()),
            **sampling, **phases.as_metrics()}
        if step == 0 or (step + 1) % max(1, cfg.sample_every) == 0:
            stage.log.samples([{"stage": "ppo", "step": step + 1, "prompt": p, "completion": t, "score": float(s)}
                               for p, t, s in list(zip(batch.prompts, batch.completions, batch.raw_scores))[:4]])
        stage.end_step(step + 1, c.max_steps, metrics,
                       extra={"kl_coef": kl_ctl.coef, "reward_moments": scaler.moments.state_dict()})
    return stage.finish({"steps": c.max_steps, "final_reward": metrics.get("reward"),
                         "final_kl": metrics.get("kl"), "kl_coef": kl_ctl.coef, **sources,
                         "reward_source": c.reward_fn or ("python function" if reward_fn else "reward model"),
                         "runtime_s": time.time() - stage.started})
