"""Fixtures for the engine tests: tiny JSONL datasets, a reward-function file, an in-process CLI."""

from __future__ import annotations

import random

import pytest
import torch
from engine_helpers import WORDS, write_jsonl

# The tiny model gains nothing from intra-op threads, and on a busy 2-core box OpenMP's
# spinning threads make each tiny matmul ~100x slower. One thread keeps the folder fast.
torch.set_num_threads(1)


@pytest.fixture
def data(tmp_path):
    rng = random.Random(0)
    d = tmp_path / "data"
    d.mkdir()
    words = [rng.choice(WORDS) for _ in range(12)]
    files = {
        "sft": write_jsonl(d / "sft.jsonl", [{"prompt": f"say {w}", "response": f"{w} {w}"} for w in words[:8]]
                           + [{"messages": [{"role": "system", "content": "be brief"},
                                            {"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "hello"}]}]),
        "prefs": write_jsonl(d / "prefs.jsonl", [{"prompt": f"say {w}", "chosen": w, "rejected": "no"}
                                                 for w in words[:10]]
                             + [{"prompt": "say sun", "response": "sun", "score": 1.0}]),
        "prompts": write_jsonl(d / "prompts.jsonl", [{"prompt": f"say {w}"} for w in words[:6]]),
    }
    rf = d / "rewards.py"
    rf.write_text("def count_a(prompts, completions):\n"
                  "    assert len(prompts) == len(completions)\n"
                  "    return [float(c.count('a')) for c in completions]\n")
    files["reward_fn"] = f"{rf}:count_a"
    return files


@pytest.fixture
def cli(capsys):
    """Run ``rlfuse ARGS`` in this process; returns (exit code, stdout, stderr)."""
    from rlfuse.engine.cli import main

    def run(*args):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
