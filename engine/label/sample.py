"""``rlfuse label sample``: K distinct responses per prompt from a checkpoint, written ahead of time.

Responses come from the engine's sampler (``generate_rollout`` -> ``Backbone.generate``: pure
softmax(logits / T), the distribution PPO samples), with the checkpoint's adapter as the
policy (SFT or PPO; none = the bare base model). Duplicates (same text up to surrounding
whitespace) are dropped and the prompt is sampled again, up to ``rounds`` times; a prompt
left with fewer than 2 distinct responses has nothing to rank and is dropped. Each task
records the sampling parameters and the checkpoint, so labels can be traced back.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..backbone import POLICY, load_backbone, load_tokenizer
from ..checkpoint import load_into_backbone, resolve_checkpoint, write_text_atomic
from ..config import MAX_SEED, ModelConfig, seed_ok
from ..data import Prompt, encode_prompt, prompt_messages, read_jsonl
from ..rollout import generate_rollout
from .records import Task


def read_prompt_chats(path) -> list[tuple[str, str | None, list[dict]]]:
    """(user prompt, system or None, chat messages) per line: one user turn, optional system."""
    chats = []
    for lineno, rec in read_jsonl(path):
        where = f"{path}:{lineno}"
        if "messages" not in rec and "prompt" not in rec:
            raise ValueError(f"{where}: expected {{'prompt'}} or {{'messages'}}, got keys {sorted(rec)}")
        msgs = prompt_messages(rec, where)
        roles = [m["role"] for m in msgs]
        if roles not in (["user"], ["system", "user"]):
            raise ValueError(f"{where}: a labelling task holds one user turn and an optional system message, "
                             f"got roles {roles}")
        chats.append((msgs[-1]["content"], msgs[0]["content"] if roles[0] == "system" else None, msgs))
    return chats


def sample_tasks(model: ModelConfig, prompts_path, out, *, k: int = 4, adapter: str | None = None,
                 max_new_tokens: int = 64, temperature: float = 1.0, rounds: int = 4, batch_size: int = 8,
                 max_prompt_length: int = 256, seed: int = 0, device: str = "auto") -> dict:
    if k < 2:
        raise ValueError(f"-k must be >= 2 (a ranking needs at least two responses), got {k}")
    if rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {rounds}")
    if not seed_ok(seed):  # before the model loads, as the training verbs check theirs
        raise ValueError(f"--seed must be an integer from 0 to {MAX_SEED}, got {seed}")
    tok = load_tokenizer(model)
    chats = read_prompt_chats(prompts_path)  # input errors before the model load
    ckpt = resolve_checkpoint(adapter) if adapter else None
    backbone = load_backbone(model, device=device, adapters=[POLICY], tokenizer=tok)
    if ckpt is not None:
        load_into_backbone(backbone, ckpt, POLICY)
    torch.manual_seed(seed)
    prompts = [Prompt(user, tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                      encode_prompt(tok, msgs)[-max_prompt_length:]) for user, _, msgs in chats]
    found: list[dict[str, str]] = [{} for _ in chats]  # stripped text -> text, in sampling order
    for _ in range(rounds):
        todo = [i for i in range(len(chats)) if len(found[i]) < k]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start: start + batch_size]
            ro = generate_rollout(backbone, [prompts[i] for i in chunk], n_samples=k,
                                  max_new_tokens=max_new_tokens, temperature=temperature)
            for row, text in enumerate(ro.completions):
                seen = found[chunk[row // k]]
                if len(seen) < k:
                    seen.setdefault(text.strip(), text)
    sampling = {"model": model.name_or_path, "adapter": str(ckpt) if ckpt else None, "k": k,
                "temperature": temperature, "top_k": 0, "top_p": 1.0, "max_new_tokens": max_new_tokens,
                "seed": seed, "sampler": "rlfuse Backbone.generate"}
    tasks = [Task(f"t{i:05d}", user, list(found[i].values()), system, sampling)
             for i, (user, system, _) in enumerate(chats) if len(found[i]) >= 2]
    if not tasks:
        raise ValueError(f"{prompts_path}: no prompt got 2 distinct responses in {rounds} rounds "
                         "(raise --temperature or --max-new-tokens)")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, "".join(json.dumps(t.to_json(), ensure_ascii=False) + "\n" for t in tasks))
    short = sum(1 for t in tasks if len(t.responses) < k)
    return {"tasks": len(tasks), "out": str(out), "dropped_prompts": len(chats) - len(tasks),
            "tasks_with_fewer_than_k": short, "sampling": sampling}
