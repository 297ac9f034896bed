"""Helpers shared by the engine tests (a plain module: pytest's conftest is not importable
by name when tests/ has its own conftest.py)."""

from __future__ import annotations

import json

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]

# keep every run on the tiny preset and a few steps, so the folder runs in minutes on 2 cores
FAST = ["--no-progress", "--device", "cpu", "--model", "tiny",
        "--set", "sft.batch_size=4", "--set", "rm.batch_size=4",
        "--set", "ppo.batch_size=2", "--set", "ppo.n_samples=2", "--set", "ppo.max_new_tokens=4",
        "--set", "ppo.ppo_epochs=1", "--set", "ppo.minibatch_size=4", "--set", "save_every=100"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def one_line_error(code, err, *words):
    """A refused command: exit code 2 and ONE line `rlfuse: error: ...` naming ``words``, no traceback."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("rlfuse: error: "), err
    assert all(w in lines[0] for w in words), err
    return lines[0]


def chat_prompts(tok, texts=("say red", "a longer prompt", "hi")):
    """``data.Prompt``s of one user turn each, rendered with the tokenizer's chat template."""
    from rlfuse.engine.data import Prompt

    out = []
    for t in texts:
        rendered = tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
        out.append(Prompt(t, rendered, tok(rendered, add_special_tokens=False)["input_ids"]))
    return out


def length_reward(prompts, completions):
    """A reward that varies with the completion (its length mod 3)."""
    return [float(len(c) % 3) for c in completions]


def random_policy_backbone(scale: float = 0.2, seed: int = 0):
    """The tiny test model with a trainable ``policy`` adapter set to random non-zero LoRA weights
    (peft starts B at zero, where the policy would equal the base)."""
    import torch

    from rlfuse.engine.backbone import load_backbone
    from rlfuse.engine.config import ModelConfig

    bb = load_backbone(ModelConfig(), device="cpu", adapters=["policy"])
    bb.set_trainable(["policy"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bb.adapter_parameters("policy"):
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return bb
