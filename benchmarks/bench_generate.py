"""Rollout generation: the engine's sampler (``rlfuse.engine.sampler``) vs ``model.generate``.

Same model, same left-padded batch of chat prompts, exactly ``--new-tokens`` new tokens on both
sides: EOS stopping is switched off on both (the model's ``generation_config.eos_token_id`` is
cleared for ``generate``; the sampler gets no EOS ids), so neither side adds a min-length
processor and both decode every step for every row. ``generate`` samples with
``do_sample=True, top_k=0, top_p=1.0`` (its config's other processors, if any, still run: that
is its real cost); the sampler samples exactly softmax(logits / T) with per-row keys.
What the sampler saves besides the sampling itself: its preallocated KV cache (no per-step
concatenation) and its prefill, which runs identical rows (``--group``) and the prompts' common
prefix of real tokens (here the chat template's 27-token system turn) once each; both engines
decode every row through the same per-token matmuls.

Each measurement runs in a fresh process (one untimed warm-up call of 2 tokens, then one timed
call); the engines alternate and the order flips every repeat, so load on a shared machine hits
both alike. Reported: median tokens/s (batch x new tokens / wall time), per CPU-second too, the
ratio, and each engine's matmul floor (``roofline.MatmulFloor``: the call's weight matmuls alone at
its own shapes; generate prefills every row's every column, the sampler each distinct prompt once)
with the share of it each reaches, and the ceiling (generate's time / the sampler's floor).

    rlfuse bench --scenarios generate                         # SmolLM2-135M, batch 32, 32 tokens
    rlfuse bench --scenarios generate --sizes generate:model=tiny-small,batch=8 --repeats 3
    rlfuse bench --scenarios generate --sizes generate:group=4 generate:compile=1
"""

from __future__ import annotations

import time

from .roofline import MatmulFloor
from .spec import RunScenario, floor_cell, fraction

def _load(name: str):
    import torch

    from rlfuse.engine import tiny

    if name in tiny.PRESETS:
        tok = tiny.build_tokenizer()
        model = tiny.build_model(tok, name)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .baselines import smollm2_dir

        directory = smollm2_dir() if name == "smollm2" else name
        tok = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok


def _batch(tok, batch: int, group: int = 1):
    """``batch`` rows: ``batch // group`` chat prompts of different lengths (so the batch is really
    left-padded), each repeated ``group`` times in adjacent rows (GRPO's samples of one prompt)."""
    from rlfuse.engine.data import pad

    rows = []
    for i in range(0, batch, group):
        # i itself in the text: every prompt distinct (a period in i would let the sampler's
        # prefill deduplicate rows that generate computes, flattering the sampler)
        text = f"What's {i}-{(i * 7) % 10} and {(i * 3) % 10}+{i % 4}?" + " Explain." * (i % 5)
        msgs = [{"role": "user", "content": text}]
        if tok.chat_template:
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        rows += [tok(text, add_special_tokens=False)["input_ids"]] * min(group, batch - i)
    return pad(rows, tok.pad_token_id, side="left")


def _runner(engine: str, model, tok, compile_: bool):
    import torch

    from rlfuse.engine.sampler import sample_tokens

    if engine == "hf_generate":
        model.generation_config.eos_token_id = None  # no EOS stop: exactly max_new_tokens per row

        def run(ids, attn, n):
            with torch.no_grad():
                return model.generate(input_ids=ids, attention_mask=attn, do_sample=True, top_k=0, top_p=1.0,
                                      temperature=1.0, max_new_tokens=n, pad_token_id=tok.pad_token_id,
                                      use_cache=True)[:, ids.shape[1]:]
    elif engine == "rlfuse_sampler":
        def run(ids, attn, n):
            keys = [(0, 0, i, 0) for i in range(ids.shape[0])]
            return sample_tokens(model.get_decoder(), model.get_output_embeddings(), model.config, ids, attn,
                                 max_new_tokens=n, eos_token_ids=[], pad_token_id=tok.pad_token_id,
                                 row_keys=keys, compile=compile_).tokens
    else:
        raise ValueError(f"unknown engine {engine!r}")
    return run


class GenerateScenario(RunScenario):
    """The rollout sampler vs ``model.generate`` (see ``bench_generate.py``'s docstring): fresh
    process per run, engines interleaved, median tokens/s (wall; and per CPU-second, less sensitive
    to load), exactly N new tokens per row on both sides. Floor = the call's weight matmuls alone at
    its shapes; "% of floor" = floor / time; ceiling = generate's time / the sampler's floor (the
    largest speed-up a sampler doing the sampler's matmuls could reach here)."""

    op = "generate"
    title = "Generation: rlfuse sampler vs model.generate"
    engines = ("hf_generate", "rlfuse_sampler")
    metrics = ("seconds", "tokens_per_s", "cpu_s", "tokens_per_cpu_s", "prompt_len", "matmul_gflop", "matmul_floor_s")
    plot_label = "tokens/s"
    repeats = 5
    timeout_s = 1800
    _base = dict(model="smollm2", batch=32, group=1, new_tokens=32, compile=0)
    sizes_by_preset = {"quick": [dict(_base, model="tiny-small", batch=4, new_tokens=8)],
                       "full": [_base, dict(_base, group=4)], "target": [_base],
                       "gpu": [dict(_base, batch=64, new_tokens=128)]}

    def child(self, engine, size, ctx):
        model, tok = _load(size["model"])
        ids, attn = _batch(tok, size["batch"], size["group"])
        run = _runner(engine, model, tok, bool(size["compile"]))
        run(ids, attn, 2)  # warm-up: allocator, lazy inits (and compilation, when on)
        with MatmulFloor(model) as mf:
            t0, c0 = time.perf_counter(), time.process_time()
            out = run(ids, attn, size["new_tokens"])
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        assert out.shape == (size["batch"], size["new_tokens"]), out.shape
        n = size["batch"] * size["new_tokens"]
        f = mf.floor()
        return {"seconds": dt, "tokens_per_s": n / dt, "cpu_s": cpu, "tokens_per_cpu_s": n / cpu,
                "prompt_len": int(ids.shape[1]), "matmul_gflop": f["gflop"], "matmul_floor_s": f["floor_s"]}

    def finish(self, size, med):
        g, s = med["hf_generate"], med["rlfuse_sampler"]
        for m in (g, s):
            m["floor_fraction"] = fraction(m.get("matmul_floor_s"), m["seconds"])
        return {"ratio_sampler_over_generate": s["tokens_per_s"] / g["tokens_per_s"],
                "ratio_per_cpu_s": s["tokens_per_cpu_s"] / g["tokens_per_cpu_s"],
                "ceiling": fraction(g["seconds"], s.get("matmul_floor_s"))}

    def stem(self, res):
        s = res["size"]
        return f"generate-{s['model']}-b{s['batch']}-g{s['group']}-n{s['new_tokens']}" + \
            ("-compiled" if s["compile"] else "")

    def columns(self, res):
        s, g, r = res["size"], res["median"]["hf_generate"], res["median"]["rlfuse_sampler"]
        return [("model", s["model"]), ("batch", s["batch"]), ("samples/prompt", s["group"]),
                ("new tokens", s["new_tokens"]), ("prompt len", g.get("prompt_len", "-")),
                ("compile", "on" if s["compile"] else "off"), ("generate tok/s", f"{g['tokens_per_s']:.1f}"),
                ("sampler tok/s", f"{r['tokens_per_s']:.1f}"), ("ratio", f"**{res['ratio_sampler_over_generate']:.2f}x**"),
                ("ratio per CPU-s", f"{res['ratio_per_cpu_s']:.2f}x"),
                ("generate floor (% of it)", floor_cell(g, "seconds")), ("sampler floor (% of it)", floor_cell(r, "seconds")),
                ("ceiling", "-" if res.get("ceiling") is None else f"{res['ceiling']:.2f}x")]

    def plot_values(self, res):
        return {e: m["tokens_per_s"] for e, m in res["median"].items()}


BENCH = GenerateScenario()


def test_generate_rlfuse_sampler(benchmark):
    """pytest-benchmark entry: one sampler call on the tiny-small model (batch 8, 16 tokens)."""
    model, tok = _load("tiny-small")
    ids, attn = _batch(tok, 8, 1)
    run = _runner("rlfuse_sampler", model, tok, False)
    out = benchmark(run, ids, attn, 16)
    assert out.shape == (8, 16)
