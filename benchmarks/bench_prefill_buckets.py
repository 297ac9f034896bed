"""The sampler's length-bucketed prefill against one padded prefill batch, on prompts of very
different lengths (the usual case with a real prompt set and distinct prompts per row).

Same model, same prompts, same row keys: the only difference is ``_MAX_BUCKETS`` (4, the default,
vs 1). Each (repeat, layout) a fresh process, interleaved; the completions must be identical (the
test suite checks log-probs too): each run returns a checksum of its tokens.

    rlfuse bench --scenarios prefill_buckets     # SmolLM2-135M, 32 prompts of ~40-185 tokens
"""

from __future__ import annotations

import time

from .spec import RunScenario


def _prompts(tok, n: int) -> list[list[int]]:
    """``n`` distinct chat prompts, lengths spread over ~4x (a sentence repeated 0-14 times)."""
    rows = []
    for i in range(n):
        text = (f"Question {i}: " + "Please think about this carefully and explain each step. " * (i % 8 * 2)
                + f"What is {i}+{i * 3}?")
        if tok.chat_template:
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        rows.append(tok(text, add_special_tokens=False)["input_ids"])
    return rows


class PrefillBucketsScenario(RunScenario):
    """The sampler's prefill in length buckets (``buckets``, the default 4) vs one padded batch
    (``one_batch``), same prompts and row keys: median seconds per call, prefill positions, the
    speed-up, and whether both produced the same tokens."""

    op = "prefill_buckets"
    title = "Sampler prefill: length buckets vs one padded batch"
    engines = ("buckets", "one_batch")
    metrics = ("seconds", "prefill_positions", "tokens_checksum")
    plot_label = "seconds per sampler call"
    _base = dict(model="smollm2", batch=32, new_tokens=16)
    sizes_by_preset = {"quick": [dict(_base, model="tiny-small", batch=8, new_tokens=4)], "full": [_base],
                       "target": [_base]}

    def child(self, engine, size, ctx):
        import torch

        import rlfuse.engine.sampler as sampler
        from rlfuse.engine.data import pad

        from .bench_generate import _load

        model, tok = _load(size["model"])
        ids, attn = pad(_prompts(tok, size["batch"]), tok.pad_token_id, side="left")
        sampler._MAX_BUCKETS = sampler._MAX_BUCKETS if engine == "buckets" else 1

        def run():
            return sampler.sample_tokens(model.get_decoder(), model.get_output_embeddings(), model.config, ids, attn,
                                         max_new_tokens=size["new_tokens"], eos_token_ids=[],
                                         pad_token_id=tok.pad_token_id,
                                         row_keys=[(0, 0, i, 0) for i in range(size["batch"])]).tokens

        run()  # warm-up
        t0 = time.perf_counter()
        tokens = run()
        weights = 1 + torch.arange(tokens.numel()).view_as(tokens)  # an order-sensitive checksum
        return {"seconds": time.perf_counter() - t0, "prefill_positions": sampler.prefill_tokens(ids, attn),
                "tokens_checksum": int((tokens * weights).sum() % 1_000_003)}

    def finish(self, size, med):
        b, o = med["buckets"], med["one_batch"]
        return {"speedup": o["seconds"] / b["seconds"], "same_tokens": b["tokens_checksum"] == o["tokens_checksum"]}

    def columns(self, res):
        s, m = res["size"], res["median"]
        return [("model, batch, new tokens", f"{s['model']}, {s['batch']}, {s['new_tokens']}"),
                ("buckets s", f"{m['buckets']['seconds']:.3f}"), ("one batch s", f"{m['one_batch']['seconds']:.3f}"),
                ("prefill positions (buckets / one)",
                 f"{m['buckets']['prefill_positions']:.0f} / {m['one_batch']['prefill_positions']:.0f}"),
                ("speed-up", f"**{res['speedup']:.2f}x**"), ("same tokens", str(res["same_tokens"]))]


BENCH = PrefillBucketsScenario()
