"""The sampler's length-bucketed prefill against one padded prefill batch, on prompts of very
different lengths (the usual case with a real prompt set and distinct prompts per row).

Same model, same prompts, same row keys: the only difference is ``_MAX_BUCKETS`` (4, the default,
vs 1). Both calls are timed in the same process, alternating, the order flipped each repeat; the
completions must be identical (the test suite checks log-probs too).

    python benchmarks/bench_prefill_buckets.py        # SmolLM2-135M, 32 prompts of ~40-185 tokens
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _prompts(tok, n: int) -> list[list[int]]:
    """``n`` distinct chat prompts, lengths spread over ~4x (a sentence repeated 0-14 times)."""
    rows = []
    for i in range(n):
        text = (f"Question {i}: " + "Please think about this carefully and explain each step. " * (i % 8 * 2)
                + f"What is {i}+{i * 3}?")
        rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        rows.append(tok(rendered, add_special_tokens=False)["input_ids"])
    return rows


def main(argv=None) -> int:
    import torch

    import rlfuse.engine.sampler as sampler
    from rlfuse.engine.data import pad

    from .bench_generate import _load, _machine

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "results" / "cpu-amd-epyc-2c"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, tok = _load(a.model)
    ids, attn = pad(_prompts(tok, a.batch), tok.pad_token_id, side="left")
    keys = [(0, 0, i, 0) for i in range(a.batch)]

    def run():
        return sampler.sample_tokens(model.get_decoder(), model.get_output_embeddings(), model.config, ids, attn,
                                     max_new_tokens=a.new_tokens, eos_token_ids=[], pad_token_id=tok.pad_token_id,
                                     row_keys=keys)

    default_buckets = sampler._MAX_BUCKETS
    modes = {"buckets": default_buckets, "one_batch": 1}
    times: dict[str, list[float]] = {m: [] for m in modes}
    tokens, positions = {}, {}
    run()  # warm-up
    for r in range(a.repeats):
        for mode in (list(modes) if r % 2 == 0 else list(modes)[::-1]):
            sampler._MAX_BUCKETS = modes[mode]
            positions[mode] = sampler.prefill_tokens(ids, attn)
            t0 = time.perf_counter()
            tokens[mode] = run().tokens
            times[mode].append(time.perf_counter() - t0)
    sampler._MAX_BUCKETS = default_buckets
    same = bool(torch.equal(tokens["buckets"], tokens["one_batch"]))
    _u_ids, u_mask, _inv, c = sampler._prefill_plan(ids, attn.long())
    med = {m: statistics.median(v) for m, v in times.items()}
    result = {"model": a.model, "batch": a.batch, "new_tokens": a.new_tokens, "threads": a.threads,
              "machine": _machine(), "prompt_lengths": sorted(attn.sum(1).tolist()),
              "buckets": [(len(rows), width) for rows, width in sampler.length_buckets(u_mask.sum(1) - c)],
              "prefill_positions": positions,
              "seconds": times, "median_s": med, "speedup": med["one_batch"] / med["buckets"],
              "same_tokens": same, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"prefill-buckets-{Path(a.model).name}-b{a.batch}-n{a.new_tokens}.json").write_text(
        json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("buckets", "prefill_positions", "median_s", "speedup", "same_tokens")}))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
