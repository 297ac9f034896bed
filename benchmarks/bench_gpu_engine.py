"""One PPO iteration (generate, score, update) on real model shapes with random weights:
peak memory, step time and generation tokens/s, for rlfuse's shared backbone (one base,
4-bit NF4 on a GPU, LoRA adapters policy / sft / reward, value and reward heads) and for
the four-separate-bf16-models layout (``baselines.SeparateModelsPPO``) where it fits.

    python -m rlfuse.benchmarks.bench_gpu_engine --model llama-1b --layout shared --out runs.jsonl
    python -m rlfuse.benchmarks.bench_gpu_engine --model llama-8b --layout separate --out runs.jsonl
    python -m rlfuse.benchmarks.bench_gpu_engine --tiny          # CPU check: tiny shape, no 4-bit
    python -m rlfuse.benchmarks.bench_gpu_engine --summarize runs.jsonl   # markdown table

The models are built from configs (no downloads): Llama-3.2-1B's and Llama-3.1-8B's shapes,
random weights made on the device, the decoder's linear layers quantized to NF4 in place with
bitsandbytes (double quantization, bf16 compute), like ``load_backbone``'s 4-bit path. Each run
is one process and appends one JSON line to ``--out``; an out-of-memory is a result ("does
not fit"), not a crash. The first iteration is a short warm-up (CUDA / Triton start-up), the
second is measured. Peak memory is the device's peak allocation during the measured step,
models included (the 24 GB goal is about the whole step).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

from .spec import RunScenario

# real shapes (Hugging Face configs of meta-llama/Llama-3.2-1B and Llama-3.1-8B)
SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False, rope_theta=10000.0),
}
GOAL_8B_GIB = 24.0


def llama_config(shape: str):
    from transformers import LlamaConfig
    return LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2)


def build_base(shape: str, device, dtype, quant: str):
    """A random-weight Llama of ``shape`` on ``device``; ``quant="nf4"`` quantizes the decoder's
    linear layers (not the embeddings or the LM head, as bitsandbytes loading does)."""
    import torch
    from transformers import LlamaForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234)
            model = LlamaForCausalLM(llama_config(shape))
    finally:
        torch.set_default_dtype(previous)
    model.config._attn_implementation = "sdpa"
    model.requires_grad_(False)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    if quant == "nf4":
        quantize_nf4_(model, dtype)
    elif quant != "none":
        raise ValueError(f"--quant: unknown value {quant!r} (nf4 or none)")
    return model


def quantize_nf4_(model, compute_dtype) -> int:
    """Replace every decoder ``nn.Linear`` by a bitsandbytes NF4 ``Linear4bit`` holding the same
    weights, one layer at a time (the bf16 copy of a layer is freed as soon as it is packed)."""
    import bitsandbytes as bnb
    import torch

    n = 0
    for parent in list(model.model.layers.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                  device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                         quant_type="nf4").to(child.weight.device)
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, q)
            n += 1
    model.is_loaded_in_4bit = True
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return n


def run(args) -> dict:
    import torch

    from . import baselines as B
    from .bench_ppo_step import KL_COEF, SharedBackboneStep, _lora_config

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    quant = args.quant or ("nf4" if device.type == "cuda" and args.layout == "shared" else "none")
    shape = "tiny" if args.tiny else args.model
    row = {"model": shape, "layout": args.layout, "quant": quant, "device": str(device), "backend": args.backend,
           "dtype": str(dtype).replace("torch.", ""), "batch": args.batch, "prompt_len": args.prompt_len,
           "new_tokens": args.new_tokens, "status": "ok"}
    if device.type == "cuda":
        row["gpu"] = torch.cuda.get_device_name(device)
        row["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    size = dict(H=SHAPES[shape]["hidden_size"], V=SHAPES[shape]["vocab_size"], B=args.batch, P=args.prompt_len,
                R=args.new_tokens)
    t0 = time.perf_counter()
    scope = contextlib.ExitStack()
    try:
        if args.layout == "shared":
            base = build_base(shape, device, dtype, quant)
            runner = SharedBackboneStep(size, device, dtype, base=base, quantized=quant != "none")
            del base
            step = runner.step
        else:
            def make_base():
                return build_base(shape, device, dtype, "none")
            runner = B.SeparateModelsPPO(make_base, _lora_config(), kl_coef=KL_COEF)
            step = None
        row["build_s"] = round(time.perf_counter() - t0, 2)
        g = torch.Generator(device="cpu").manual_seed(0)
        vocab = SHAPES[shape]["vocab_size"]

        def prompts(p):
            return torch.randint(10, vocab, (args.batch, p), generator=g).to(device)

        def one(p, r):
            if step is not None:
                runner.cfg.max_new_tokens = r
                return step(prompts(p))
            return runner.step(prompts(p), r)

        import rlfuse.kernels as K
        scope.enter_context(K.use_backend(args.backend))  # both layouts' rlfuse ops run on --backend
        torch.manual_seed(0)
        one(min(32, args.prompt_len), min(8, args.new_tokens))  # warm-up: kernels, handles, JIT
        from .measure import memory_meter
        meter = memory_meter(device)
        before = meter.start()  # the peak counts from here (models included: it is absolute)
        t1 = time.perf_counter()
        out = one(args.prompt_len, args.new_tokens)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        row["step_s"] = round(time.perf_counter() - t1, 3)
        peak = meter.peak()
        row["resident_before_gib"] = round(before / 2**30, 3)
        row["peak_gib"] = round(peak / 2**30, 3)
        row["tokens"] = out.get("tokens")
        if "generate_s" in out:
            row.update(generate_s=round(out["generate_s"], 3), score_s=round(out["score_s"], 3),
                       update_s=round(out["update_s"], 3),
                       generate_tokens_per_s=round(out["generated_tokens"] / out["generate_s"], 1))
        row["loss"] = out.get("loss")
        if shape == "llama-8b" and args.layout == "shared" and device.type == "cuda":
            row["goal"] = f"peak <= {GOAL_8B_GIB:g} GiB: " + ("PASS" if row["peak_gib"] <= GOAL_8B_GIB else "MISS")
    except torch.cuda.OutOfMemoryError as exc:
        row.update(status="does not fit", error=f"OutOfMemoryError: {str(exc).splitlines()[0][:200]}")
    except Exception as exc:  # noqa: BLE001 - a failed configuration is a row of the report
        first = (str(exc).strip().splitlines() or [""])[0]
        row.update(status="error", error=f"{type(exc).__name__}: {first[:300]}")
    finally:
        scope.close()
    row["wall_s"] = round(time.perf_counter() - t0, 2)
    return row


def summarize(path: Path) -> str:
    """A markdown table of the JSON lines in ``path``."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = ["| model | layout | quant | status | peak GiB | step s | generate s | gen tok/s | score s | update s "
           "| note |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        note = r.get("goal") or r.get("error") or ""
        out.append(f"| {r['model']} | {r['layout']} | {r['quant']} | {r['status']} | {r.get('peak_gib', '-')} | "
                   f"{r.get('step_s', '-')} | {r.get('generate_s', '-')} | {r.get('generate_tokens_per_s', '-')} | "
                   f"{r.get('score_s', '-')} | {r.get('update_s', '-')} | {note.replace('|', '/')} |")
    return "\n".join(out) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_gpu_engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("llama-1b", "llama-8b"), default="llama-1b")
    p.add_argument("--tiny", action="store_true", help="tiny shape (CPU check of this script)")
    p.add_argument("--layout", choices=("shared", "separate"), default="shared",
                   help="shared: rlfuse's one backbone; separate: four bf16 models (policy, ref, reward, value)")
    p.add_argument("--quant", choices=("nf4", "none"), default=None,
                   help="shared layout's base weights (default: nf4 on CUDA, none on CPU)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--backend", default="auto", help="rlfuse kernel backend (auto, torch, cpp, triton, cuda)")
    p.add_argument("--out", type=Path, default=None, help="append the result as one JSON line here")
    p.add_argument("--summarize", type=Path, default=None, metavar="JSONL", help="print a markdown table and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from .machine import drop_repo_root_from_path
    drop_repo_root_from_path()
    if args.summarize:
        print(summarize(args.summarize), end="")
        return 0
    if args.tiny and (args.batch, args.prompt_len, args.new_tokens) == (8, 512, 256):
        args.batch, args.prompt_len, args.new_tokens = 2, 16, 8
    row = run(args)
    line = json.dumps(row)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(line + "\n")
    print(line, flush=True)
    return 0 if row["status"] in ("ok", "does not fit") else 1


class GpuEngineScenario(RunScenario):
    """One PPO iteration at real model shapes, random weights (see ``bench_gpu_engine.py``'s
    docstring): rlfuse's shared backbone (NF4 on a GPU) vs four separate models, each a fresh
    process; peak memory (models included), step time and generation tokens/s."""

    op = "gpu_engine"
    title = "One PPO iteration at Llama shapes: shared backbone vs four models"
    engines = ("shared", "separate")
    metrics = ("step_s", "peak_gib", "generate_tokens_per_s")
    plot_label = "seconds per PPO iteration"
    repeats = 1
    timeout_s = 900
    sizes_by_preset = {"quick": [dict(model="tiny", batch=2, prompt_len=16, new_tokens=8)],
                       "gpu": [dict(model=m, batch=8, prompt_len=512, new_tokens=256) for m in ("llama-1b", "llama-8b")]}

    def child(self, engine, size, ctx):
        tiny = size["model"] == "tiny"
        args = build_parser().parse_args(["--layout", engine, "--batch", str(size["batch"]), "--prompt-len",
                                          str(size["prompt_len"]), "--new-tokens", str(size["new_tokens"]),
                                          *(["--tiny"] if tiny else ["--model", size["model"]])])
        row = run(args)
        if row["status"] == "error":
            raise RuntimeError(row["error"])
        return {k: v for k, v in row.items() if v is not None}

    def stem(self, res):  # shared and separate may be run apart (gpu_check.sh): one file each
        return f"gpu_engine-{res['size']['model']}-" + "-".join(res["runs"])

    def columns(self, res):
        cells = [("model, batch x prompt + new", f"{res['size']['model']}, {res['size']['batch']}x"
                                                 f"{res['size']['prompt_len']}+{res['size']['new_tokens']}")]
        for e in self.engines:
            run = (res["runs"].get(e) or [{}])[0]
            m = res["median"].get(e, {})
            cells.append((f"{e}: quant, status, peak GiB, step s, gen tok/s",
                          ", ".join(str(x) for x in (run.get("quant", "-"), run.get("status", "not run"),
                                                     m.get("peak_gib", "-"), m.get("step_s", "-"),
                                                     m.get("generate_tokens_per_s", "-")))))
        return cells


BENCH = GpuEngineScenario()

if __name__ == "__main__":
    sys.exit(main())
