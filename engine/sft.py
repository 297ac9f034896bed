"""Supervised fine-tuning of the ``sft`` adapter: next-token loss on response tokens only.

    for each batch:  hidden = backbone(ids) with the "sft" adapter
                     loss = -mean(log p(response token | prefix))   via K.linear_logprobs
The adapter it saves becomes PPO's frozen reference and the policy's starting point.
"""

from __future__ import annotations

import time

import torch

from .backbone import load_backbone, load_tokenizer
from .config import RunConfig
from .data import epoch_batches, load_sft_dataset, pad, steps_per_epoch
from .metrics import peak_memory_mb, reset_peak_memory
from .optim import make_optimizer
from .stage import Stage

ADAPTER = "sft"


def sft_loss(backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor):
    """Mean negative log-likelihood of the tokens where ``loss_mask`` is 1."""
    hidden = backbone.hidden_states(input_ids, attention_mask)
    target = loss_mask[:, 1:].bool()  # hidden[t] predicts token t+1
    logp = backbone.token_logprobs(hidden[:, :-1][target], input_ids[:, 1:][target])
    return -logp.mean(), int(target.sum())


def train_sft(cfg: RunConfig, *, callbacks=()) -> dict:
    c = cfg.sft
    stage = Stage(cfg, "sft", callbacks)
    tok = load_tokenizer(cfg.model)
    examples = load_sft_dataset(c.data, tok, c.max_length)  # data errors before the model load
    backbone = load_backbone(cfg.model, device=stage.device, adapters=[ADAPTER], tokenizer=tok)
    backbone.set_trainable([ADAPTER])
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
        batch = [examples[i] for i in epoch_batches(len(examples), c.batch_size, cfg.seed, step)]
        ids, attn = pad([e.input_ids for e in batch], tok.pad_token_id, device=stage.device)
        loss_mask, _ = pad([e.loss_mask for e in batch], 0, device=stage.device)

        with backbone.use(ADAPTER):
            loss, n_tokens = sft_loss(backbone, ids, attn, loss_mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(backbone.adapter_parameters(ADAPTER), c.max_grad_norm)
        optimizer.step()

        dt = time.perf_counter() - t0
        stage.end_step(step + 1, total, {
            "loss": loss.item(), "grad_norm": float(grad_norm), "tokens": n_tokens,
            "tokens_per_s": int(attn.sum()) / dt, "step_time_s": dt, "peak_mem_mb": peak_memory_mb(stage.device)})
    return stage.finish({"steps": total, "final_loss": loss.item(), "examples": len(examples),
                         "runtime_s": time.time() - stage.started})
