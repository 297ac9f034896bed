"""Reward model: the ``reward`` adapter + a scalar head on the last token.

Bradley-Terry on preference pairs,   loss = -log sigmoid(r(chosen) - r(rejected)),
plus, when rated responses are given, regression_coef * (r(response) - score)^2.
Chosen, rejected and rated sequences of a step go through ONE forward. A held-out share
of the pairs measures pairwise accuracy (how often r(chosen) > r(rejected)).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .backbone import load_backbone, load_tokenizer
from .config import RunConfig
from .data import epoch_batches, load_reward_dataset, pad, steps_per_epoch
from .metrics import peak_memory_mb, reset_peak_memory
from .optim import make_optimizer
from .stage import Stage

ADAPTER = "reward"


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(chosen - rejected).mean()


@torch.no_grad()
def pairwise_accuracy(backbone, pairs, batch_size: int) -> float:
    """Share of pairs whose chosen response outscores the rejected one (ties count half)."""
    if not pairs:
        return float("nan")
    was_training = backbone.model.training
    backbone.train(False)
    wins = 0.0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i: i + batch_size]
        ids, attn = pad([p.chosen_ids for p in chunk] + [p.rejected_ids for p in chunk],
                        backbone.tokenizer.pad_token_id, device=backbone.device)
        r = backbone.reward_scores(ids, attn)
        rc, rr = r[: len(chunk)], r[len(chunk):]
        wins += float((rc > rr).sum() + 0.5 * (rc == rr).sum())
    backbone.train(was_training)
    return wins / len(pairs)


def split_pairs(pairs: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic train / held-out split (at least one pair of each when possible)."""
    if eval_fraction <= 0 or len(pairs) < 2:
        return pairs, []
    n_eval = min(max(1, round(eval_fraction * len(pairs))), len(pairs) - 1)
    perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    return [pairs[i] for i in perm[n_eval:]], [pairs[i] for i in perm[:n_eval]]


def train_reward(cfg: RunConfig, *, callbacks=()) -> dict:
    c = cfg.rm
    stage = Stage(cfg, "rm", callbacks)
    if c.data is None and c.ratings is None:
        raise ValueError("no reward-model data given (set rm.data, e.g. --data prefs.jsonl, and/or rm.ratings)")
    tok = load_tokenizer(cfg.model)
    pairs, ratings = load_reward_dataset(c.data, tok, c.max_length)  # data errors before the model load
    ratings += load_reward_dataset(c.ratings, tok, c.max_length)[1] if c.ratings else []
    backbone = load_backbone(cfg.model, device=stage.device, adapters=[ADAPTER], tokenizer=tok)
    train_pairs, eval_pairs = split_pairs(pairs, c.eval_fraction, cfg.seed)
    n_primary = len(train_pairs) or len(ratings)  # an epoch is a pass over the pairs (or the ratings)
    total = c.max_steps if c.max_steps is not None else c.epochs * steps_per_epoch(n_primary, c.batch_size)

    backbone.set_trainable([ADAPTER])
    params = backbone.adapter_parameters(ADAPTER) + list(backbone.reward_head.parameters())
    optimizer = make_optimizer(params, lr=c.lr, weight_decay=c.weight_decay, device=stage.device,
                               kind=cfg.model.optimizer)
    stage.attach(backbone, ADAPTER, {"reward_head": backbone.reward_head}, optimizer)
    start, _ = stage.restore()
    if start >= total:
        return stage.finished_summary()

    def evaluate() -> dict:
        return {"eval_accuracy": pairwise_accuracy(backbone, eval_pairs, c.batch_size)} if eval_pairs else {}

    backbone.train()
    metrics: dict = {}
    for step in stage.progress(start, total):
        t0 = time.perf_counter()
        reset_peak_memory(stage.device)
        seqs, n_pairs, targets = [], 0, []
        if train_pairs:
            batch = [train_pairs[i] for i in epoch_batches(len(train_pairs), c.batch_size, cfg.seed, step)]
            seqs += [p.chosen_ids for p in batch] + [p.rejected_ids for p in batch]
            n_pairs = len(batch)
        if ratings:
            rated = [ratings[i] for i in epoch_batches(len(ratings), c.batch_size, cfg.seed + 1, step)]
            seqs += [r.input_ids for r in rated]
            targets = [r.score for r in rated]
        ids, attn = pad(seqs, tok.pad_token_id, device=stage.device)

        scores = backbone.reward_scores(ids, attn)
        loss = scores.new_zeros(())
        metrics = {}
        if n_pairs:
            chosen, rejected = scores[:n_pairs], scores[n_pairs: 2 * n_pairs]
            bt = bradley_terry_loss(chosen, rejected)
            loss = loss + bt
            metrics.update(bt_loss=bt.item(), train_accuracy=(chosen > rejected).float().mean().item(),
                           margin=(chosen - rejected).mean().item())
        if targets:
            mse = F.mse_loss(scores[2 * n_pairs:], torch.tensor(targets, device=scores.device))
            loss = loss + c.regression_coef * mse
            metrics["rating_mse"] = mse.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
        optimizer.step()

        dt = time.perf_counter() - t0
        metrics.update(loss=loss.item(), grad_norm=float(grad_norm), tokens_per_s=int(attn.sum()) / dt,
                       step_time_s=dt, peak_mem_mb=peak_memory_mb(stage.device))
        stage.end_step(step + 1, total, metrics, on_save=evaluate)
    final = evaluate()
    return stage.finish({"steps": total, "final_loss": metrics.get("loss"), "train_pairs": len(train_pairs),
                         "eval_pairs": len(eval_pairs), "ratings": len(ratings), **final,
                         "runtime_s": time.time() - stage.started})
