"""TRL 1.x with and without ``rlfuse.integrations.trl.patch()``: step time and peak memory.

TRL's own fused LM head (``add_fused_lm_head`` → ``trl.kernels.ChunkedLogProbFunction``) is
the bar: the patch must not be slower or hungrier. Three measurements, on a tiny random
Llama with a real vocabulary (V = 32000, hidden 256, 2 layers):

* ``head``: the kernel alone, ``ChunkedLogProbFunction.apply`` vs ``RlfuseChunkedLogProb.apply``
  on [N, H] hidden states, forward + backward with entropy;
* ``step``: the trainer's scoring step, ``model(..., labels=..., fused_lm_head=True)`` →
  GRPO-style loss → backward, on a [B, T] batch;
* ``grpo``: real ``GRPOTrainer`` steps (generation + scoring + update), TRL's ``step_time``.

Times are medians of interleaved repeats (plain and patched alternate, so load on a shared
machine hits both alike). Peak memory is the peak resident memory above what was resident
before the measured call, each case in a fresh process with the peak reset right before it
(``/proc/self/clear_refs``; ``ru_maxrss`` where that is unavailable).

    python benchmarks/bench_trl_patch.py            # writes benchmarks/results/trl_patch.md (+ .json)
    pytest benchmarks/bench_trl_patch.py --benchmark-only
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
VOCAB, HIDDEN, LAYERS = 32000, 256, 2
SIZES = {
    "quick": {"N": 512, "B": 2, "T": 128, "prompt": 32, "grpo_steps": 2, "completion": 8, "repeats": 3},
    "full": {"N": 2048, "B": 4, "T": 256, "prompt": 64, "grpo_steps": 3, "completion": 16, "repeats": 3},
}
MODES = ("trl", "rlfuse")


# ------------------------------------------------------------------------- memory probe

def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


class PeakRSS:
    """Peak resident bytes above the resident set at ``start()``."""

    def __init__(self):
        try:
            self.libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self.libc = None
        self.exact = False

    def start(self):
        import gc
        gc.collect()
        if self.libc is not None:
            self.libc.malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.exact = True
        except OSError:
            self.exact = False
        self.base = _status().get("VmRSS", 0)

    def stop(self) -> float:
        if self.exact:
            peak = _status().get("VmHWM", 0)
        else:
            import resource
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(0, peak - self.base) / 2**20


# ------------------------------------------------------------------------- workloads

def _model(seed=0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _tokenizer(vocab_size):
    """Offline character-level tokenizer padded with placeholder tokens to ``vocab_size``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = ["<pad>", "<unk>", "<bos>", "<eos>"] + list("abcdefghijklmnopqrstuvwxyz0123456789 .,:?!+-=")
    vocab = {t: i for i, t in enumerate(base + [f"<t{i}>" for i in range(vocab_size - len(base))])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>")


def _set_mode(mode):
    import rlfuse.integrations.trl as rt
    if mode == "rlfuse":
        rt.patch()
    else:
        rt.unpatch()


def make_head_case(size):
    """Kernel alone: returns run(mode) doing forward + backward with entropy."""
    import torch
    from trl.kernels import ChunkedLogProbFunction

    from rlfuse.integrations.trl import RlfuseChunkedLogProb

    torch.manual_seed(0)
    hidden = torch.randn(size["N"], HIDDEN, requires_grad=True)
    weight = (torch.randn(VOCAB, HIDDEN) * 0.02).requires_grad_()
    targets = torch.randint(0, VOCAB, (size["N"],))
    fns = {"trl": ChunkedLogProbFunction, "rlfuse": RlfuseChunkedLogProb}

    def run(mode):
        hidden.grad = weight.grad = None
        lp, ent, *_ = fns[mode].apply(hidden, weight, None, targets, 0.7, 32768, None, 1.0,
                                      ("log_probs", "entropy"))
        (lp.sum() + 0.01 * ent.sum()).backward()
        return float(lp.detach().sum())

    return run


def make_step_case(size):
    """The trainer's scoring step on a batch: fused forward → GRPO-style loss → backward."""
    import torch
    from trl.trainer.utils import add_fused_lm_head

    model = _model()
    add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (size["B"], size["T"]))
    labels = ids.clone()
    labels[:, : size["prompt"]] = -100
    adv = torch.randn(size["B"], 1)

    def run(mode):
        _set_mode(mode)
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        mask = out.label_mask.float()
        ratio = torch.exp(out.log_probs - out.log_probs.detach())
        loss = (-(adv * ratio) * mask).sum() / mask.sum()
        loss.backward()
        return float(loss.detach())

    return run


def _timed(fn, mode, repeats_out):
    t0 = time.perf_counter()
    fn(mode)
    repeats_out.append(time.perf_counter() - t0)


def child_timing(size, cases):
    """One process, plain and patched interleaved: median seconds per case and mode."""
    import torch
    torch.manual_seed(0)
    out = {}
    for case in cases:
        fn = {"head": make_head_case, "step": make_step_case}[case](size)
        times = {m: [] for m in MODES}
        for m in MODES:
            fn(m)  # warm-up
        for r in range(size["repeats"]):
            order = MODES if r % 2 == 0 else MODES[::-1]
            for m in order:
                _timed(fn, m, times[m])
        out[case] = {m: statistics.median(t) for m, t in times.items()}
        out[case + "_samples"] = times
    _set_mode("trl")
    return out


def child_memory(size, case, mode):
    """Fresh process: peak extra resident MB of one call of ``case`` in ``mode``."""
    fn = {"head": make_head_case, "step": make_step_case}[case](size)
    if case == "head":
        _set_mode(mode)
    probe = PeakRSS()
    probe.start()
    fn(mode)
    return {"peak_extra_mb": probe.stop(), "exact": probe.exact}


def child_grpo(size, mode):
    """Fresh process: a few real GRPOTrainer steps; TRL's step_time and the peak memory."""
    import tempfile

    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    tok = _tokenizer(VOCAB)
    model = _model()
    model.config.pad_token_id, model.config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    dataset = Dataset.from_dict({"prompt": [f"add {i} and {i + 7}:" for i in range(64)]})
    _set_mode(mode)
    with tempfile.TemporaryDirectory() as out_dir:
        args = GRPOConfig(output_dir=out_dir, max_steps=size["grpo_steps"], per_device_train_batch_size=8,
                          num_generations=8, max_completion_length=size["completion"], learning_rate=1e-4,
                          beta=0.0, temperature=0.7, logging_steps=1, report_to="none", use_cpu=True,
                          bf16=False, fp16=False, save_strategy="no", seed=0, disable_dropout=True)
        trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
                              args=args, train_dataset=dataset, processing_class=tok)
        probe = PeakRSS()
        probe.start()
        trainer.train()
        peak = probe.stop()
    steps = [row["step_time"] for row in trainer.state.log_history if "step_time" in row]
    return {"step_time": statistics.median(steps[1:] if len(steps) > 1 else steps),
            "step_times": steps, "peak_extra_mb": peak, "exact": probe.exact}


# ------------------------------------------------------------------------- driver

def _child(kind, preset, *args) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, os.path.abspath(__file__), "--preset", preset, "--child", kind, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_all(preset="full", with_grpo=True) -> dict:
    size = SIZES[preset]
    res = {"preset": preset, "size": size, "vocab": VOCAB, "hidden": HIDDEN, "layers": LAYERS}
    res["timing"] = _child("timing", preset)
    res["memory"] = {case: {m: _child("memory", preset, case, m) for m in MODES} for case in ("head", "step")}
    if with_grpo:
        res["grpo"] = {m: _child("grpo", preset, m) for m in MODES}
    return res


def _ratio(a, b):
    return a / b if b else float("nan")


def write_report(res: dict, path_md: str) -> str:
    import torch

    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    size = res["size"]
    lines = [
        "# TRL fused LM head: TRL's own vs rlfuse (`rlfuse.integrations.trl.patch()`)",
        "",
        f"Model: random Llama, vocab {res['vocab']}, hidden {res['hidden']}, {res['layers']} layers. "
        f"Preset `{res['preset']}`: head N={size['N']} tokens; step batch {size['B']}x{size['T']} "
        f"({size['prompt']} prompt tokens masked); GRPO 8 generations x {size['completion']} tokens.",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, TRL {trl_version}, "
        f"load average at write time {os.getloadavg()[0]:.1f}.",
        "",
        "ratio = rlfuse / TRL (below 1 is better for rlfuse).",
        "",
        "| measurement | TRL | rlfuse (patched) | ratio |",
        "|---|---|---|---|",
    ]
    t = res["timing"]
    labels = {"head": "kernel fwd+bwd (s, median)", "step": "scoring step fwd+bwd (s, median)"}
    for case in ("head", "step"):
        a, b = t[case]["trl"], t[case]["rlfuse"]
        lines.append(f"| {labels[case]} | {a:.3f} | {b:.3f} | {_ratio(b, a):.2f} |")
    if "grpo" in res:
        a, b = res["grpo"]["trl"]["step_time"], res["grpo"]["rlfuse"]["step_time"]
        lines.append(f"| GRPOTrainer step_time (s, median) | {a:.3f} | {b:.3f} | {_ratio(b, a):.2f} |")
    for case in ("head", "step"):
        a, b = res["memory"][case]["trl"]["peak_extra_mb"], res["memory"][case]["rlfuse"]["peak_extra_mb"]
        lines.append(f"| {case} peak extra memory (MB) | {a:.1f} | {b:.1f} | {_ratio(b, a):.2f} |")
    if "grpo" in res:
        a, b = res["grpo"]["trl"]["peak_extra_mb"], res["grpo"]["rlfuse"]["peak_extra_mb"]
        lines.append(f"| GRPOTrainer train() peak extra memory (MB) | {a:.1f} | {b:.1f} | {_ratio(b, a):.2f} |")
    exact = all(v["exact"] for c in res["memory"].values() for v in c.values())
    method = "VmHWM reset via /proc/self/clear_refs" if exact else "ru_maxrss (approximate)"
    lines += ["", f"Peak memory method: {method}; each case in a fresh process. Times are wall-clock on a",
              "shared machine: compare the ratio, not the absolute seconds.", ""]
    text = "\n".join(lines)
    os.makedirs(os.path.dirname(path_md), exist_ok=True)
    with open(path_md, "w") as f:
        f.write(text)
    with open(os.path.splitext(path_md)[0] + ".json", "w") as f:
        json.dump(res, f, indent=1)
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="full", choices=sorted(SIZES))
    parser.add_argument("--no-grpo", action="store_true", help="skip the GRPOTrainer runs")
    parser.add_argument("--out", default=os.path.join(RESULTS, "trl_patch.md"))
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        import torch
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
        size = SIZES[args.preset]
        kind, rest = args.child[0], args.child[1:]
        result = {"timing": lambda: child_timing(size, ("head", "step")),
                  "memory": lambda: child_memory(size, *rest),
                  "grpo": lambda: child_grpo(size, *rest)}[kind]()
        print(json.dumps(result))
        return result
    res = run_all(args.preset, with_grpo=not args.no_grpo)
    print(write_report(res, args.out))
    return res


# ------------------------------------------------------------------------- pytest-benchmark

try:  # only when collected by pytest
    import pytest as _pytest

    @_pytest.mark.parametrize("case,mode", [(c, m) for c in ("head", "step") for m in MODES])
    def test_trl_patch(benchmark, case, mode):
        _pytest.importorskip("trl")
        size = SIZES["quick"]
        fn = {"head": make_head_case, "step": make_step_case}[case](size)
        try:
            if case == "head":
                _set_mode(mode)
            benchmark.extra_info.update({"case": case, "mode": mode, "vocab": VOCAB, "hidden": HIDDEN, **size})
            benchmark.pedantic(fn, args=(mode,), rounds=size["repeats"], warmup_rounds=1)
        finally:
            _set_mode("trl")
except ImportError:  # pragma: no cover
    pass


if __name__ == "__main__":
    main()
