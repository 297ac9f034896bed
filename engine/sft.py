"""Supervised fine-tuning of the ``sft`` adapter: next-token loss on response tokens only.

    for each batch:  hidden = backbone(ids) with the "sft" adapter
                     loss = -mean(log p(response token | prefix))   via K.linear_logprobs
The adapter it saves becomes PPO's frozen reference and the policy's starting point.
"""

from __future__ import annotations

import time

import torch

from .backbone import load_backbone, load_tokenizer
from . import distributed as D
from .config import RunConfig
from .data import epoch_batches, load_sft_dataset, pad, steps_per_epoch
from .metrics import peak_memory_mb, reset_peak_memory
from .optim import make_optimizer
from .stage import Stage

ADAPTER = "sft"


def sft_loss(backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
             n_total: float | None = None):
    """Negative log-likelihood of the tokens where ``loss_mask`` is 1, divided by ``n_total``
    (default: their count, i.e. the mean; data-parallel ranks pass the GLOBAL count)."""
    hidden = backbone.hidden_states(input_ids, attention_mask)
    target = loss_mask[:, 1:].bool()  # hidden[t] predicts token t+1
    logp = backbone.token_logprobs(hidden[:, :-1][target], input_ids[:, 1:][target])
    n = int(target.sum())
    return (-logp.sum() / n_total if n_total is not None else -logp.mean()), n


def train_sft(cfg: RunConfig, *, callbacks=()) -> dict:
    c = cfg.sft
    stage = Stage(cfg, "sft", callbacks)
    tok = load_tokenizer(cfg.model)
    examples = load_sft_dataset(c.data, tok, c.max_length)  # data errors before the model load
    backbone = load_backbone(cfg.model, device=stage.device, adapters=[ADAPTER], tokenizer=tok)
    backbone.set_trainable([ADAPTER])
    D.prepare(backbone, cfg.distributed.strategy)  # FSDP2 sharding, before the optimizer sees the params
    optimizer = make_optimizer(backbone.adapter_parameters(ADAPTER), lr=c.lr, weight_decay=c.weight_decay,
                               device=stage.device, kind=cfg.model.optimizer)
    total = c.max_steps if c.max_steps is not None else c.epochs * steps_per_epoch(len(examples), c.batch_size)
    stage.attach(backbone, ADAPTER, {}, optimizer)
    start, _ = stage.restore()
    if start >= total:
        return stage.finished_summary()

    backbone.train()
    loss = torch.tensor(float("nan"))  # what a zero-step run reports
    for step in stage.progress(start, total):
        t0 = time.perf_counter()
        reset_peak_memory(stage.device)
        # c.batch_size is global: each data-parallel rank takes its block of the step's batch
        batch = [examples[i] for i in D.shard(epoch_batches(len(examples), c.batch_size, cfg.seed, step))]
        # a rank whose block of a short last batch is empty still joins the reductions; under FSDP2 it
        # must also run forward and backward (their collectives), on a stand-in example weighted 0
        stand_in = not batch and bool(D.fsdp_units(backbone))
        rows = batch or ([examples[0]] if stand_in else [])
        optimizer.zero_grad(set_to_none=True)
        if rows:
            ids, attn = pad([e.input_ids for e in rows], tok.pad_token_id, device=stage.device)
            loss_mask, _ = pad([e.loss_mask for e in rows], 0, device=stage.device)
        else:
            ids = attn = loss_mask = torch.zeros((0, 1), dtype=torch.long, device=stage.device)
        n_local = 0 if stand_in else int(loss_mask[:, 1:].sum())
        n_global = D.global_count(n_local) if D.world().distributed else None
        if rows:
            with backbone.use(ADAPTER):
                loss, n_tokens = sft_loss(backbone, ids, attn, loss_mask, n_global)
            if stand_in:
                loss, n_tokens = loss * 0.0, 0
            loss.backward()
        else:
            loss, n_tokens = torch.zeros((), device=stage.device), 0
        D.reduce_gradients(backbone.adapter_parameters(ADAPTER))  # sum of local_sum/global_count
        if n_global is not None:  # log the global mean, as one process would
            loss = loss.new_tensor(D.global_count(loss.item()))
        grad_norm = D.clip_grad_norm_(backbone.adapter_parameters(ADAPTER), c.max_grad_norm)
        if stage.check_update(loss, grad_norm):  # a NaN/inf stops the run (or is skipped) before it lands
            optimizer.step()

        dt = time.perf_counter() - t0
        stage.end_step(step + 1, total, {
            "loss": loss.item(), "grad_norm": float(grad_norm), "tokens": int(n_global) if n_global is not None else n_tokens,
            "tokens_per_s": int(attn.sum()) / dt, "step_time_s": dt, "peak_mem_mb": peak_memory_mb(stage.device)})
    return stage.finish({"steps": total, "final_loss": loss.item(), "examples": len(examples),
                         "runtime_s": stage.runtime_s()})
