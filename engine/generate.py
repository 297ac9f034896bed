"""``rlfuse generate``: completions of a prompt file from a trained policy, through the engine's
own sampler (exactly softmax(logits / T), or argmax), written as JSONL.

    rlfuse generate CHECKPOINT --prompts prompts.jsonl --out completions.jsonl
                    [--temperature T (default: greedy)] [--max-new-tokens N] [--n-samples K]

One output row per (prompt, sample): {"index", "sample", "prompt", "completion", "finished"}
(``finished``: the completion ended with EOS rather than at --max-new-tokens). With a
temperature, a row's randomness is a function of (--seed, prompt index, sample index) only,
as in PPO rollouts, so the output does not depend on --batch-size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def completion_text(tokenizer, tokens: list[int], eos_ids) -> tuple[str, bool]:
    """The text of one completion up to (not including) its first EOS, and whether it had one."""
    eos = set(eos_ids)
    cut = next((i for i, t in enumerate(tokens) if t in eos), None)
    body = tokens if cut is None else tokens[:cut]
    return tokenizer.decode(body, skip_special_tokens=True), cut is not None


@torch.no_grad()
def generate_rows(backbone, prompts, *, max_new_tokens: int, temperature: float | None, n_samples: int = 1,
                  seed: int = 0, batch_size: int = 8, adapter: str = "policy"):
    """Yield one output row per (prompt, sample), in prompt order."""
    from .data import pad
    from .sampler import sample

    greedy = not temperature
    if n_samples < 1:
        raise ValueError(f"--n-samples must be >= 1, got {n_samples}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    jobs = [(i, k) for i in range(len(prompts)) for k in range(n_samples)]
    tok = backbone.tokenizer
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        ids, attn = pad([prompts[i].input_ids for i, _ in chunk], tok.pad_token_id, side="left",
                        device=backbone.device)
        out = sample(backbone, ids, attn, max_new_tokens=max_new_tokens, temperature=temperature or 1.0,
                     adapter=adapter, greedy=greedy, row_keys=None if greedy else [(seed, i, k) for i, k in chunk])
        for (i, k), row in zip(chunk, out.tokens.tolist()):
            text, finished = completion_text(tok, row, backbone.eos_token_ids())
            yield {"index": i, "sample": k, "prompt": prompts[i].raw, "completion": text, "finished": finished}


def main(args) -> int:
    """The ``rlfuse generate`` verb (arguments parsed by engine/cli.py)."""
    import dataclasses

    from .checkpoint import write_text_atomic
    from .dataset_files import configure
    from .data import load_prompts
    from .trained import find_checkpoint, load_trained

    if args.temperature is not None and not args.temperature >= 0:
        raise ValueError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    find_checkpoint(args.checkpoint)  # checkpoint errors before anything loads
    out = Path(args.out)
    if out.exists() and not args.force:
        raise ValueError(f"{out} already exists; pass --force to overwrite it")
    trained = load_trained(args.checkpoint, device=args.device, overrides=args.overrides)
    bb = trained.backbone
    configure(dataclasses.replace(trained.cfg.data, split=args.split or trained.cfg.data.split))
    prompts = load_prompts(args.prompts, bb.tokenizer, trained.cfg.ppo.max_prompt_length)
    rows = list(generate_rows(bb, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              n_samples=args.n_samples, seed=args.seed, batch_size=args.batch_size))
    # written whole at the end: a killed run leaves no half file that looks finished
    write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"[rlfuse] {len(rows)} completion(s) of {len(prompts)} prompt(s) from {trained.checkpoint} -> {out}")
    return 0
