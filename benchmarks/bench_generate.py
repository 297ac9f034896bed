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
both alike. Reported: median tokens/s (batch x new tokens / wall time) and the ratio.

    python benchmarks/bench_generate.py                      # SmolLM2-135M, batch 32, 32 tokens
    python benchmarks/bench_generate.py --model tiny-small --repeats 3
    python benchmarks/bench_generate.py --profile hf         # where generate's time goes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENGINES = ("hf_generate", "rlfuse_sampler")


def _model_dir(name: str) -> str:
    if name == "smollm2":
        from rlfuse.engine.demo import dequantized_copy, find_smollm2_gguf

        return dequantized_copy(find_smollm2_gguf())[0]
    return name


def _load(name: str):
    import torch

    from rlfuse.engine import tiny

    if name in tiny.PRESETS:
        tok = tiny.build_tokenizer()
        model = tiny.build_model(tok, name)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        directory = _model_dir(name)
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
        raise ValueError(f"unknown engine {engine!r} (use {', '.join(ENGINES)})")
    return run


def _prefill_work(engine: str, ids, attn) -> tuple[int, int]:
    """(token positions one call prefills, padding included; rows the LM head sees there):
    ``generate`` pushes every row's every column, the sampler ``prefill_tokens``."""
    import torch

    from rlfuse.engine.sampler import prefill_tokens

    if engine == "rlfuse_sampler":
        return prefill_tokens(ids, attn), torch.unique(torch.cat([ids, attn], 1), dim=0).shape[0]
    return ids.numel(), ids.shape[0]


def _matmul_floor(model, engine: str, ids, attn, new_tokens: int) -> tuple[float, float]:
    """(GFLOP, seconds) of one call's weight matmuls and nothing else: every Linear of the
    decoder and the LM head, on the call's real shapes and real weights (so streamed from memory
    as in the call), once with the prefill's rows, once with the decode step's (x new tokens - 1).
    Attention scores, softmax, norms, sampling and Python are left out: the floor of a call."""
    import torch
    import torch.nn.functional as F

    weights = [m.weight for m in model.get_decoder().modules() if isinstance(m, torch.nn.Linear)]
    head = model.get_output_embeddings().weight
    prefill, head_rows = _prefill_work(engine, ids, attn)
    B = ids.shape[0]

    def one_pass(rows: int, lm_rows: int) -> float:
        xs = {n: torch.randn(rows, n, dtype=head.dtype) for n in {w.shape[1] for w in weights} | {head.shape[1]}}
        best = float("inf")
        with torch.no_grad():
            for _ in range(2):
                t0 = time.perf_counter()
                for w in weights:
                    F.linear(xs[w.shape[1]], w)
                F.linear(xs[head.shape[1]][:lm_rows], head)
                best = min(best, time.perf_counter() - t0)
        return best

    seconds = one_pass(prefill, head_rows) + (new_tokens - 1) * one_pass(B, B)
    per_position = sum(w.numel() for w in weights)
    gflop = 2 * (per_position * (prefill + B * (new_tokens - 1)) + head.numel() * (head_rows + B * (new_tokens - 1)))
    return gflop / 1e9, seconds


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model, tok = _load(args.model)
    ids, attn = _batch(tok, args.batch, args.group)
    run = _runner(args.engine, model, tok, args.compile)
    run(ids, attn, 2)  # warm-up: allocator, lazy inits (and compilation, when on)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(ids, attn, args.new_tokens)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20), file=sys.stderr)
    t0, c0 = time.perf_counter(), time.process_time()
    out = run(ids, attn, args.new_tokens)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert out.shape == (args.batch, args.new_tokens), out.shape
    n = args.batch * args.new_tokens
    # CPU seconds too: on a shared box, wall time includes waiting for a core; CPU time does not
    gflop, floor_s = _matmul_floor(model, args.engine, ids, attn, args.new_tokens)
    return {"engine": args.engine, "seconds": dt, "tokens_per_s": n / dt, "cpu_s": cpu,
            "tokens_per_cpu_s": n / cpu, "prompt_len": int(ids.shape[1]), "matmul_gflop": gflop,
            "matmul_floor_s": floor_s, "floor_fraction": floor_s / dt}


def _spawn(args, engine: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--engine", engine, "--model", args.model,
           "--batch", str(args.batch), "--group", str(args.group), "--new-tokens", str(args.new_tokens),
           "--threads", str(args.threads)]
    if args.compile:
        cmd.append("--compile")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _machine() -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 (the GGUF's float32 copy), tiny, tiny-small "
                                                           "or a local model directory")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--group", type=int, default=1, help="samples per prompt (adjacent identical rows, as in "
                                                             "GRPO): the sampler prefills each prompt once")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (the box is shared)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the sampler's decode step")
    parser.add_argument("--out", default=str(HERE / "results" / "cpu-amd-epyc-2c"))
    parser.add_argument("--profile", choices=ENGINES, help="print a torch.profiler table of one engine and exit")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    if args.profile:
        args.engine = args.profile
        print(json.dumps(child(argparse.Namespace(**{**vars(args), "profile": True}))))
        return 0

    runs: dict[str, list[dict]] = {e: [] for e in ENGINES}
    for r in range(args.repeats):
        for engine in (ENGINES if r % 2 == 0 else ENGINES[::-1]):
            runs[engine].append(_spawn(args, engine))
            print(f"[bench_generate] repeat {r + 1}/{args.repeats} {engine}: "
                  f"{runs[engine][-1]['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    median = {e: statistics.median(x["tokens_per_s"] for x in runs[e]) for e in ENGINES}
    ratio = median["rlfuse_sampler"] / median["hf_generate"]
    median_cpu = {e: statistics.median(x["tokens_per_cpu_s"] for x in runs[e]) for e in ENGINES}
    ratio_cpu = median_cpu["rlfuse_sampler"] / median_cpu["hf_generate"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    result = {"model": args.model, "batch": args.batch, "group": args.group, "new_tokens": args.new_tokens, "threads": args.threads,
              "repeats": args.repeats, "compile": args.compile, "machine": _machine(), "load_1min": load,
              "prompt_len": runs["hf_generate"][0]["prompt_len"], "median_tokens_per_s": median,
              "ratio_sampler_over_generate": ratio, "median_tokens_per_cpu_s": median_cpu,
              "ratio_per_cpu_s": ratio_cpu, "runs": runs,
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"generate-{Path(args.model).name}-b{args.batch}-g{args.group}-n{args.new_tokens}" + ("-compiled" if args.compile else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    line = (f"| {args.model} | {args.batch} | {args.group} | {args.new_tokens} | {result['prompt_len']} | {args.threads} | "
            f"{'on' if args.compile else 'off'} | {median['hf_generate']:.1f} | {median['rlfuse_sampler']:.1f} | "
            f"**{ratio:.2f}x** | {ratio_cpu:.2f}x | {args.repeats} | {load:.1f} | {result['measured_at']} |")
    md = out / "generate.md"
    if not md.exists():
        md.write_text("# Generation: rlfuse sampler vs model.generate\n\n"
                      f"Machine: {_machine()}. `python benchmarks/bench_generate.py`: fresh process per run, "
                      "engines interleaved, median tokens/s (wall; and per CPU-second of the process, less sensitive to load); exactly N "
                      "new tokens per row on both sides (EOS stop off on both). Load = 1-min load average at the end (the box is shared).\n\n"
                      "| model | batch | samples/prompt | new tokens | prompt len | threads | compile | generate tok/s | "
                      "sampler tok/s | ratio | ratio per CPU-s | repeats | load | measured |\n"
                      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    with md.open("a") as f:
        f.write(line + "\n")
    print(line)
    floor_line = _floor_row(args, runs)
    result["matmul_floor"] = floor_line[1]
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    floor_md = out / "generate-floor.md"
    if not floor_md.exists():
        floor_md.write_text(FLOOR_HEADER)
    with floor_md.open("a") as f:
        f.write(floor_line[0] + "\n")
    print(floor_line[0])
    return 0


FLOOR_HEADER = """# Generation against the matmul floor

`python benchmarks/bench_generate.py` (the same runs as generate.md). Floor = the time of the call's
weight matmuls alone: every Linear of the decoder and the LM head run back to back with `F.linear`, on the
call's real shapes and real weights (streamed from memory as in the call), once with the prefill's rows
(padding included: `generate` prefills every row's every column, the sampler each distinct prompt once and
the shared prefix once) and once per decode step; attention scores, softmax, norms, sampling and Python
left out. Measured in each engine's process after its timed call. `% of floor` = floor / time: the
share of the call that is those matmuls. `ceiling` = generate's time / the sampler's floor: the largest
speedup over `generate` a sampler doing the sampler's matmuls could reach on this machine.

| model | batch | samples/prompt | new tokens | generate GFLOP | sampler GFLOP | generate floor s | sampler floor s | generate % of floor | sampler % of floor | speedup | ceiling | measured |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
"""


def _floor_row(args, runs: dict) -> tuple[str, dict]:
    """The generate-floor.md row of one benchmark and its numbers (medians over the runs)."""
    def med(engine, key):
        return statistics.median(x[key] for x in runs[engine])

    gen_s, smp_s = med("hf_generate", "seconds"), med("rlfuse_sampler", "seconds")
    gen_f, smp_f = med("hf_generate", "matmul_floor_s"), med("rlfuse_sampler", "matmul_floor_s")
    d = {"generate_gflop": med("hf_generate", "matmul_gflop"), "sampler_gflop": med("rlfuse_sampler", "matmul_gflop"),
         "generate_floor_s": gen_f, "sampler_floor_s": smp_f, "generate_floor_fraction": gen_f / gen_s,
         "sampler_floor_fraction": smp_f / smp_s, "speedup": gen_s / smp_s, "ceiling": gen_s / smp_f}
    row = (f"| {args.model} | {args.batch} | {args.group} | {args.new_tokens} | {d['generate_gflop']:.0f} | "
           f"{d['sampler_gflop']:.0f} | {gen_f:.2f} | {smp_f:.2f} | {100 * d['generate_floor_fraction']:.0f}% | "
           f"{100 * d['sampler_floor_fraction']:.0f}% | {d['speedup']:.2f}x | {d['ceiling']:.2f}x | "
           f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} |")
    return row, d


def test_generate_rlfuse_sampler(benchmark):
    """pytest-benchmark entry: one sampler call on the tiny-small model (batch 8, 16 tokens)."""
    args = argparse.Namespace(model="tiny-small", batch=8, group=1, new_tokens=16, threads=1, engine="rlfuse_sampler",
                              compile=False, profile=False)
    model, tok = _load(args.model)
    ids, attn = _batch(tok, args.batch, args.group)
    run = _runner(args.engine, model, tok, False)
    out = benchmark(run, ids, attn, args.new_tokens)
    assert out.shape == (8, 16)


if __name__ == "__main__":
    sys.exit(main())
