"""Supervised fine-tuning of the ``sft`` adapter: next-token loss on response tokens only.

    for each batch:  hidden = backbone(ids) with the "sft" adapter
                     loss = -mean(log p(response token | prefix))   via K.linear_logprobs
                     (over micro-batches of ``sft.micro_batch_size`` examples, gradients summed)
The adapter it saves becomes PPO's frozen reference and the policy's starting point.
"""

from __future__ import annotations

import time

import torch

from .backbone import REFERENCE, load_backbone, load_tokenizer
from . import distributed as D
from .config import RunConfig
from .data import epoch_batches, load_sft_dataset, pad, steps_per_epoch
from .memory import micro_batches, same_count_on_every_rank
from .metrics import peak_memory_mb, reset_peak_memory
from .optim import gradient_step, make_optimizer
from .stage import Stage

ADAPTER = REFERENCE  # SFT trains the adapter that PPO later freezes as the reference


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
                               eps=c.adam_eps, device=stage.device, kind=cfg.model.optimizer)
    total = c.max_steps if c.max_steps is not None else c.epochs * steps_per_epoch(len(examples), c.batch_size)
    stage.attach(backbone, ADAPTER, {}, optimizer)
    start, _ = stage.restore()
    if start >= total:
        return stage.finished_summary()

    backbone.train()
    params = backbone.adapter_parameters(ADAPTER)
    loss = float("nan")  # what a zero-step run reports
    for step in stage.progress(start, total):
        t0 = time.perf_counter()
        reset_peak_memory(stage.device)
        # c.batch_size is global: each data-parallel rank takes its block of the step's batch
        batch = [examples[i] for i in D.shard(epoch_batches(len(examples), c.batch_size, cfg.seed, step))]
        # one forward + backward per micro-batch of c.micro_batch_size examples, each loss its
        # log-likelihood sum over the STEP's token count: the gradients add up to the batch mean's.
        # Under FSDP2 every rank runs as many passes (collectives): a rank short of examples (an
        # empty block of a short last batch) runs stand-ins weighted 0
        groups = same_count_on_every_rank(micro_batches([1] * len(batch), c.micro_batch_size), backbone)
        n_local = sum(sum(e.loss_mask[1:]) for e in batch)  # hidden[t] predicts token t+1
        n_total = D.global_count(n_local) if D.world().distributed else n_local
        optimizer.zero_grad(set_to_none=True)
        loss, n_real = 0.0, 0
        for group in groups:
            rows = [batch[i] for i in group] or [examples[0]]
            ids, attn = pad([e.input_ids for e in rows], tok.pad_token_id, device=stage.device)
            loss_mask, _ = pad([e.loss_mask for e in rows], 0, device=stage.device)
            with backbone.use(ADAPTER):
                part, _ = sft_loss(backbone, ids, attn, loss_mask, n_total)
            if not group:
                part = part * 0.0
            part.backward()  # frees this micro-batch's graph before the next forward
            loss += part.item()
            n_real += int(attn.sum()) if group else 0
        if D.world().distributed:  # log the global mean, as one process would
            loss = D.global_count(loss)
        # a NaN/inf stops the run (or is skipped) before it lands
        grad_norm, _ = gradient_step(optimizer, params, loss, max_grad_norm=c.max_grad_norm,
                                     check_update=stage.check_update)

        dt = time.perf_counter() - t0
        stage.end_step(step + 1, total, {
            "loss": loss, "grad_norm": float(grad_norm), "tokens": int(n_total), "tokens_per_s": n_real / dt,
            "step_time_s": dt, "micro_batches": len(groups), "peak_mem_mb": peak_memory_mb(stage.device)})
    return stage.finish({"steps": total, "final_loss": loss, "examples": len(examples),
                         "runtime_s": stage.runtime_s()})
