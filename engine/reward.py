"""Reward model: the ``reward`` adapter + a scalar head on the last token, trained on rankings.

A training element is one prompt's ranking of K >= 2 responses (a pair line is a K=2
ranking). As in InstructGPT, all of a ranking's C(K,2) non-tied pairs form ONE element and
each response goes through the model once; a step's batch is ``rm.batch_size`` prompts.

    rm.loss = bradley-terry   element loss = mean over its non-tied pairs (i above j) of
                              -log sigmoid(r_i - r_j)
    rm.loss = plackett-luce   element loss = -log P(ranking) / (number of choices), where the
                              best remaining response is chosen from those still unranked.
                              Ties follow Breslow: every member of a tied group is chosen
                              from the same remaining set (its tied partners included).
For K=2 without a tie both losses are -log sigmoid(r_1 - r_2). Rated responses add
regression_coef * (r(response) - score)^2.

Memory: a step's responses go through the model in micro-batches of whole rankings (then
ratings), at most ``rm.micro_batch_size`` responses each (a larger ranking goes alone), one
forward + backward per micro-batch. A micro-batch's loss is its mean weighted by its share of
the step's rankings (ratings), so the accumulated gradient is exactly the whole batch's; the
held-out evaluation scores in the same chunks without a graph.

The held-out share is split by PROMPT, never by pair: the pairs of one prompt share
responses, so splitting them would leak. The held-out metric is pairwise accuracy over the
held-out prompts' non-tied pairs.

With ``rm.init_from_sft`` (default) the reward adapter starts from the SFT adapter when one
exists (``rm.sft_checkpoint``, else ``<run_dir>/sft``), as InstructGPT and OpenRLHF do.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .backbone import REWARD, load_backbone, load_tokenizer
from .checkpoint import latest_checkpoint, load_into_backbone, resolve_checkpoint
from . import distributed as D
from .config import RunConfig
from .data import Ranking, epoch_batches, load_rankings, pad, steps_per_epoch
from .memory import micro_batches, same_count_on_every_rank
from .metrics import peak_memory_mb, reset_peak_memory
from .optim import gradient_step, make_optimizer
from .stage import Stage

ADAPTER = REWARD
LOSSES = ("bradley-terry", "plackett-luce")


def ranking_pairs(ranks: list[int]) -> list[tuple[int, int]]:
    """(better, worse) index pairs of every non-tied pair of a ranking (1 = best)."""
    return [(i, j) for i in range(len(ranks)) for j in range(len(ranks)) if ranks[i] < ranks[j]]


def bradley_terry_loss(scores: list[torch.Tensor], ranks: list[list[int]]) -> torch.Tensor:
    """Mean over elements of the mean over each element's non-tied pairs of -log sigmoid(r_i - r_j)."""
    losses = []
    for s, rk in zip(scores, ranks):
        better, worse = zip(*ranking_pairs(rk))
        losses.append(-F.logsigmoid(s[list(better)] - s[list(worse)]).mean())
    return torch.stack(losses).mean()


def plackett_luce_loss(scores: list[torch.Tensor], ranks: list[list[int]]) -> torch.Tensor:
    """Mean over elements of -log PL(ranking) per choice, ties by Breslow (see the module doc)."""
    losses = []
    for s, rk in zip(scores, ranks):
        rk_t = torch.tensor(rk, device=s.device)
        levels = sorted(set(rk))
        log_lik, choices = s.new_zeros(()), 0
        for level in levels[:-1]:  # the last group has nothing left to be chosen over
            group, remaining = rk_t == level, rk_t >= level
            n = int(group.sum())
            log_lik = log_lik + s[group].sum() - n * torch.logsumexp(s[remaining], dim=0)
            choices += n
        losses.append(-log_lik / choices)
    return torch.stack(losses).mean()


def ranking_loss(kind: str, scores: list[torch.Tensor], ranks: list[list[int]]) -> torch.Tensor:
    if kind == "bradley-terry":
        return bradley_terry_loss(scores, ranks)
    if kind == "plackett-luce":
        return plackett_luce_loss(scores, ranks)
    raise ValueError(f"config key 'rm.loss': expected one of {', '.join(LOSSES)}, got {kind!r}")


def score_rankings(backbone, rankings: list[Ranking]) -> list[torch.Tensor]:
    """Reward scores of every response of ``rankings``: ONE forward, each response once
    (callers bound its size with ``micro_batches``)."""
    seqs = [ids for r in rankings for ids in r.response_ids]
    ids, attn = pad(seqs, backbone.tokenizer.pad_token_id, device=backbone.device)
    return list(torch.split(backbone.reward_scores(ids, attn), [len(r.response_ids) for r in rankings]))


def pair_wins(scores: list[torch.Tensor], rankings: list[Ranking]) -> tuple[float, int]:
    """(wins, pairs) over the non-tied pairs: a pair is won when the better response outscores
    the worse one; a tied score counts half."""
    wins, n = 0.0, 0
    for s, r in zip(scores, rankings):
        for i, j in ranking_pairs(r.ranks):
            wins += 1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0
            n += 1
    return wins, n


@torch.no_grad()
def pairwise_accuracy(backbone, rankings: list[Ranking], batch_size: int, max_rows: int | None = None) -> float:
    """Share of the non-tied pairs whose better response outscores the worse one (ties half),
    scoring ``batch_size`` rankings and at most ``max_rows`` responses per forward."""
    was_training = backbone.model.training
    backbone.train(False)
    wins, n = 0.0, 0
    for group in micro_batches([len(r.response_ids) for r in rankings], max_rows, max_items=batch_size):
        chunk = [rankings[i] for i in group]
        w, k = pair_wins(score_rankings(backbone, chunk), chunk)
        wins, n = wins + w, n + k
    backbone.train(was_training)
    return wins / n if n else float("nan")


def split_by_prompt(rankings: list[Ranking], eval_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic train / held-out split of the PROMPTS (at least one of each when there
    are two prompts or more); all rankings of a prompt land on the same side."""
    keys = list(dict.fromkeys(r.prompt_key for r in rankings))  # first-seen order
    if eval_fraction <= 0 or len(keys) < 2:
        return rankings, []
    n_eval = min(max(1, round(eval_fraction * len(keys))), len(keys) - 1)
    perm = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = {keys[i] for i in perm[:n_eval]}
    return [r for r in rankings if r.prompt_key not in held_out], [r for r in rankings if r.prompt_key in held_out]


def sft_start_checkpoint(cfg: RunConfig) -> Path | None:
    """The SFT checkpoint the reward adapter starts from, or None (fresh LoRA)."""
    c = cfg.rm
    if not c.init_from_sft:
        return None
    if c.sft_checkpoint:
        return resolve_checkpoint(c.sft_checkpoint)
    return latest_checkpoint(Path(cfg.run_dir) / "sft")


def train_reward(cfg: RunConfig, *, callbacks=()) -> dict:
    c = cfg.rm
    if c.loss not in LOSSES:
        raise ValueError(f"config key 'rm.loss': expected one of {', '.join(LOSSES)}, got {c.loss!r}")
    stage = Stage(cfg, "rm", callbacks)
    if c.data is None and c.ratings is None:
        raise ValueError("no reward-model data given (set rm.data, e.g. --data prefs.jsonl, and/or rm.ratings)")
    tok = load_tokenizer(cfg.model)
    rankings, ratings = [], []
    for path in (c.data, c.ratings):  # data errors before the model load
        if path is not None:
            more_rankings, more_ratings = load_rankings(path, tok, c.max_length)
            rankings, ratings = rankings + more_rankings, ratings + more_ratings
    n_all_tied = sum(1 for r in rankings if not ranking_pairs(r.ranks))
    rankings = [r for r in rankings if ranking_pairs(r.ranks)]  # a ranking of ties only teaches nothing
    if not rankings and not ratings:
        raise ValueError(f"{c.data}: no ranking with a non-tied pair and no rating to train on")
    sft_ckpt = sft_start_checkpoint(cfg)
    backbone = load_backbone(cfg.model, device=stage.device, adapters=[ADAPTER], tokenizer=tok)
    if sft_ckpt is not None:  # a resumed run overwrites this with its own checkpoint in restore()
        load_into_backbone(backbone, sft_ckpt, ADAPTER)
    train_set, eval_set = split_by_prompt(rankings, c.eval_fraction, cfg.seed)
    n_primary = len(train_set) or len(ratings)  # an epoch is a pass over the prompts (or the ratings)
    total = c.max_steps if c.max_steps is not None else c.epochs * steps_per_epoch(n_primary, c.batch_size)

    backbone.set_trainable([ADAPTER])
    D.prepare(backbone, cfg.distributed.strategy)  # FSDP2 sharding, before the optimizer sees the params
    params = backbone.adapter_parameters(ADAPTER) + list(backbone.reward_head.parameters())
    optimizer = make_optimizer(params, lr=c.lr, weight_decay=c.weight_decay, eps=c.adam_eps, device=stage.device,
                               kind=cfg.model.optimizer)
    stage.attach(backbone, ADAPTER, {"reward_head": backbone.reward_head}, optimizer)
    start, _ = stage.restore()
    if start >= total:
        return stage.finished_summary()

    evaluated: dict[int, dict] = {}  # by step: the last step's checkpoint evaluation is also the final one

    def evaluate() -> dict:
        if stage.step_done not in evaluated:
            evaluated.clear()
            evaluated[stage.step_done] = {"eval_accuracy": pairwise_accuracy(
                backbone, eval_set, c.batch_size, c.micro_batch_size)} if eval_set else {}
        return evaluated[stage.step_done]

    loss_key = {"bradley-terry": "bt_loss", "plackett-luce": "pl_loss"}[c.loss]
    backbone.train()
    metrics: dict = {}
    for step in stage.progress(start, total):
        t0 = time.perf_counter()
        reset_peak_memory(stage.device)
        # batch sizes are global: each data-parallel rank takes its block of the step's rankings and
        # ratings, and weighs its means by its share so the summed gradients are the global means'
        batch = [train_set[i] for i in D.shard(epoch_batches(len(train_set), c.batch_size, cfg.seed, step))] \
            if train_set else []
        rated = [ratings[i] for i in D.shard(epoch_batches(len(ratings), c.batch_size, cfg.seed + 1, step))] \
            if ratings else []
        share_ranked, share_rated = (len(batch) / max(1.0, D.global_count(len(batch))),
                                     len(rated) / max(1.0, D.global_count(len(rated))))
        optimizer.zero_grad(set_to_none=True)
        # one forward + backward per micro-batch of whole rankings (then ratings), at most
        # rm.micro_batch_size responses each: a micro-batch's loss is its mean times its share of
        # the batch, so the gradients add up to the whole batch's. Under FSDP2 every rank runs as
        # many passes (collectives); a rank short of data runs stand-ins weighted 0
        items = [len(r.response_ids) for r in batch] + [1] * len(rated)
        groups = same_count_on_every_rank(micro_batches(items, c.micro_batch_size), backbone)
        loss, rl, mse, n_tok, scored = 0.0, 0.0, 0.0, 0, []
        for group in groups:
            g_rank = [batch[i] for i in group if i < len(batch)]
            g_rate = [rated[i - len(batch)] for i in group if i >= len(batch)]
            seqs = [ids for r in g_rank for ids in r.response_ids] + [r.input_ids for r in g_rate]
            rows = seqs or [train_set[0].response_ids[0] if train_set else ratings[0].input_ids]
            ids, attn = pad(rows, tok.pad_token_id, device=stage.device)
            scores = backbone.reward_scores(ids, attn)
            part = scores.sum() * 0.0 if not seqs else scores.new_zeros(())
            n_ranked = len(seqs) - len(g_rate)
            if g_rank:
                per_prompt = list(torch.split(scores[:n_ranked], [len(r.response_ids) for r in g_rank]))
                weight = len(g_rank) / len(batch)  # the batch loss is a mean over its rankings
                g_rl = ranking_loss(c.loss, per_prompt, [r.ranks for r in g_rank])
                part = part + g_rl * (weight * share_ranked)
                rl += g_rl.item() * weight
                scored += [s.detach() for s in per_prompt]
            if g_rate:
                target = torch.tensor([r.score for r in g_rate], device=scores.device)
                weight = len(g_rate) / len(rated)
                g_mse = F.mse_loss(scores[n_ranked:], target)
                part = part + c.regression_coef * g_mse * (weight * share_rated)
                mse += g_mse.item() * weight
            part.backward()  # frees this micro-batch's graph before the next forward
            loss += part.item()
            n_tok += int(attn.sum()) if seqs else 0  # a stand-in row is not counted
        metrics = {"micro_batches": len(groups)}
        if batch:
            wins, n_pairs = pair_wins(scored, batch)
            margins = [float(s[i] - s[j]) for s, r in zip(scored, batch) for i, j in ranking_pairs(r.ranks)]
            metrics.update({loss_key: rl, "train_accuracy": wins / n_pairs,
                            "margin": sum(margins) / len(margins), "pairs": n_pairs})
        if rated:
            metrics["rating_mse"] = mse
        # a NaN/inf stops the run (or is skipped) before it lands
        grad_norm, _ = gradient_step(optimizer, params, loss, max_grad_norm=c.max_grad_norm,
                                     check_update=stage.check_update)

        dt = time.perf_counter() - t0
        metrics.update(loss=D.global_count(loss) if stage.world.distributed else loss,
                       grad_norm=float(grad_norm), tokens_per_s=D.global_count(n_tok) / dt,
                       step_time_s=dt, peak_mem_mb=peak_memory_mb(stage.device))
        if stage.world.distributed:  # the other means over the global batch (loss is already global)
            metrics = {**D.reduce_metrics({k: v for k, v in metrics.items() if k != "loss"},
                                          weight=float(max(1, len(batch)))), "loss": metrics["loss"]}
        stage.end_step(step + 1, total, metrics, on_save=evaluate)
    final = evaluate()
    n_pairs_of = lambda rs: sum(len(ranking_pairs(r.ranks)) for r in rs)  # noqa: E731
    return stage.finish({"steps": total, "final_loss": metrics.get("loss"), "loss_kind": c.loss,
                         "train_prompts": len({r.prompt_key for r in train_set}),
                         "eval_prompts": len({r.prompt_key for r in eval_set}),
                         "train_rankings": len(train_set), "eval_rankings": len(eval_set),
                         "train_pairs": n_pairs_of(train_set), "eval_pairs": n_pairs_of(eval_set),
                         "skipped_all_tied": n_all_tied, "ratings": len(ratings),
                         "init_from": str(sft_ckpt) if sft_ckpt else None, **final,
                         "runtime_s": time.time() - stage.started})
