"""Batch invariance of the scored log-probs (issue 22, after TRL #6789): score ONE set of rollouts
with different batch compositions and compare each token's log-prob with the reference scoring.

Variants, each against the reference (rollout scored in one batch, ``score_batch_size`` >= rows):
  * score_batch=N     scoring in batches of N rows (N = 1 or a cut through the prompt groups
                      changes which rows share a prompt pass, ``engine/prefix_share.py``)
  * chunk=C           the fused LM head's token chunk (``K.linear_logprobs(chunk_size=C)``)
  * no_prefix_share   every row's prompt run in its own row (the plain forward)
  * update_forward    the PPO update's forward: train mode, gradients on, micro-batches of
                      ``ppo.micro_batch_size`` rows, with and without gradient checkpointing
For each: max |delta log-prob| over response tokens, and the share of tokens whose ratio
exp(delta) leaves [0.999, 1.001]. float32 and bfloat16 in one run.
Run: ``python -m benchmarks.batch_invariance [--model tiny-small|smollm2] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


ADAPTER_SCALE = [0.3]  # std of the random LoRA weights (--adapter-scale)


def _backbone(model: str, dtype: str, grad_ckpt: bool = False):
    from rlfuse.engine.backbone import load_backbone
    from rlfuse.engine.config import ModelConfig

    bb = load_backbone(ModelConfig(name_or_path=model, dtype=dtype, gradient_checkpointing=grad_ckpt), device="cpu",
                       adapters=["policy"])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a trained-looking adapter: LoRA B is zero at init
        for p in bb.adapter_parameters("policy"):
            p.copy_(torch.randn(p.shape, generator=g) * ADAPTER_SCALE[0])
    return bb


def _prompts(tok, n: int):
    from rlfuse.engine.data import Prompt

    out = []
    for i in range(n):
        text = f"What's {i + 3}+{2 * i + 5}?" + " Answer in one word, please." * (3 * (i % 3))  # padded rows
        rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        out.append(Prompt(text, rendered, tok(rendered, add_special_tokens=False)["input_ids"]))
    return out


def _stats(logp: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> dict:
    d = (logp - ref)[mask].double()
    ratio = d.exp()
    return {"max_abs_dlogp": float(d.abs().max()), "mean_abs_dlogp": float(d.abs().mean()),
            "frac_ratio_outside_0.999_1.001": float(((ratio < 0.999) | (ratio > 1.001)).double().mean()),
            "tokens": int(mask.sum())}


def measure(model: str, dtype: str, P: int, G: int, L: int, micro_batch: int, share: bool | None) -> dict:
    import rlfuse.kernels as K
    from rlfuse.engine.backbone import POLICY
    from rlfuse.engine.prefix_share import plain_completion_hidden_states
    from rlfuse.engine.rollout import generate_rollout, policy_outputs, score_rollout
    from rlfuse.engine.update_plan import micro_batches

    bb = _backbone(model, dtype)
    bb.share_prompts = share
    ro = generate_rollout(bb, _prompts(bb.tokenizer, P), n_samples=G, max_new_tokens=L, temperature=1.0, seed=7)
    mask = ro.response_mask.bool()
    zero = lambda prompts, completions: [0.0] * len(completions)  # noqa: E731
    Pl, ids, attn = ro.prompt_len, ro.input_ids, ro.attention_mask

    def scored(batch_size: int) -> torch.Tensor:
        score_rollout(bb, ro, reward_fn=zero, with_values=False, batch_size=batch_size)
        return ro.logp.clone()

    ref = scored(len(ro))
    out = {"sampled_vs_scored": _stats(ro.sample_logp * mask, ref, mask)}
    for n in sorted({1, 2, G - 1, G, 2 * G} - {0}):
        if n < len(ro):
            out[f"score_batch={n}"] = _stats(scored(n), ref, mask)
    bb.train(False)
    with torch.no_grad(), bb.use(POLICY):
        h = bb.completion_hidden_states(ids, attn, Pl)
        labels = ids[:, Pl:]
        for c in (1, 7, 64):
            lp = K.linear_logprobs(h, bb.lm_head.weight, labels, chunk_size=c, **bb.logit_options)
            out[f"chunk={c}"] = _stats(lp * mask, ref, mask)
        hp = plain_completion_hidden_states(bb.decoder, ids, attn, Pl)
        out["no_prefix_share"] = _stats(bb.token_logprobs(hp, labels) * mask, ref, mask)
    for mbs, ckpt in ((micro_batch, False), (micro_batch, True), (1, False)):
        ub = _backbone(model, dtype, grad_ckpt=ckpt)
        ub.share_prompts = share
        ub.set_trainable([POLICY])
        ub.train(True)
        logp = torch.zeros_like(ref)
        for rows in micro_batches(torch.arange(len(ro)), G, mbs):
            with ub.use(POLICY):
                lp, _, _ = policy_outputs(ub, ids[rows], attn[rows], Pl, temperature=1.0, with_values=False)
            logp[rows] = lp.detach() * mask[rows]
        out[f"update_forward(micro_batch={mbs}, ckpt={'on' if ckpt else 'off'})"] = _stats(logp, ref, mask)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-small")
    ap.add_argument("--P", type=int, default=4)
    ap.add_argument("--G", type=int, default=4)
    ap.add_argument("--L", type=int, default=24)
    ap.add_argument("--micro-batch", type=int, default=2, help="rows per update forward (cuts the prompt groups)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--adapter-scale", type=float, default=0.3,
                    help="std of the random LoRA weights (LoRA B starts at 0: a policy after some training)")
    ap.add_argument("--out", default=None, help="folder for batch-invariance-<model>.json / .md")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    ADAPTER_SCALE[0] = a.adapter_scale
    from .machine import cpu_model

    name = a.model
    if a.model == "smollm2":  # the benchmarks' float32 folder of it, read as model.name_or_path
        from .baselines import smollm2_dir

        a.model = smollm2_dir()
    res = {"model": name, "adapter_scale": a.adapter_scale, "P": a.P, "G": a.G, "L": a.L, "micro_batch": a.micro_batch, "cpu": cpu_model(),
           "threads": a.threads, "load_1min": os.getloadavg()[0],
           "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    # share None: the prefix-sharing rule decided per batch (before issue 22); True: PPO's rule
    # for G >= 2 now (backbone.share_prompts, fixed per run)
    cols = [(dt, share) for dt in ("float32", "bfloat16") for share in (None, True)]
    for dt, share in cols:
        res[f"{dt}/share={share}"] = measure(a.model, dt, a.P, a.G, a.L, a.micro_batch, share)
    head = " | ".join(f"{'fp32' if dt == 'float32' else 'bf16'} {'per batch' if share is None else 'per run'}"
                      for dt, share in cols)
    lines = [f"Batch invariance, {name}, P={a.P} G={a.G} L={a.L}, random LoRA weights of std {a.adapter_scale} ({res['cpu']}, {a.threads} thread, "
             f"load {res['load_1min']:.1f}, {res['measured_at']}): each variant against the rollout scored in "
             "one batch; max |delta log-prob| (share of tokens whose ratio leaves [0.999, 1.001]). 'per batch': "
             "prefix sharing decided per batch (before); 'per run': backbone.share_prompts fixed for the run "
             "(PPO now).", "", f"| variant | {head} |", "|---" * (len(cols) + 1) + "|"]
    for k in res["float32/share=None"]:
        cells = [res[f"{dt}/share={share}"][k] for dt, share in cols]
        lines.append(f"| {k} | " + " | ".join(f"{c['max_abs_dlogp']:.1e} ({100 * c['frac_ratio_outside_0.999_1.001']:.1f}%)"
                                              for c in cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"batch-invariance-{name}-lora{a.adapter_scale:g}.json").write_text(json.dumps(res, indent=1) + "\n")
        (out / f"batch-invariance-{name}-lora{a.adapter_scale:g}.md").write_text(text)
    return res


if __name__ == "__main__":
    main()
