"""One GRPO step end to end: rlfuse (``engine.ppo.train_ppo``) vs TRL 1.x ``GRPOTrainer``, same work.

Both engines, each in a fresh process (interleaved, order flipped every repeat), run ``--steps``
GRPO iterations on:

* the same saved model: a random Llama (the ``tiny-small`` preset, ~12M params, byte tokenizer)
  written to a temp dir, or ``--model smollm2`` (SmolLM2-135M-Instruct, float32 copy of the GGUF);
* the same chat prompts ("What's a+b?") and the same Python rule reward (digits in the answer);
* P prompts x G samples per step, exactly L new tokens per sample;
* the same LoRA (r=8, alpha=16, all linear layers), AdamW at the same learning rate;
* the same KL to the reference (the base model: LoRA disabled) in the loss, beta > 0, k3 estimator;
* gradient checkpointing on in both (TRL 1.16's GRPOConfig default; ``--no-grad-ckpt``: off in both);
* one optimisation pass per step (TRL: num_iterations=1, one step per generation batch;
  rlfuse: ppo_epochs=1, one minibatch of P x G), token-mean loss (TRL's "dapo"), group-std advantages.

What differs (stated in the results too):
* forcing exactly L tokens: TRL uses ``min_new_tokens=L`` (its logits processor bans EOS until L);
  rlfuse turns EOS stopping off for the benchmark (``eos_token_ids() -> []``), so EOS is an ordinary
  token. Same number of tokens per row, same forward work.
* batch order: each engine draws its own prompt order (same prompt pool, same lengths).
* rlfuse samples with its own exact sampler; TRL with ``model.generate`` (do_sample, top_k=0, top_p=1).
* prefix sharing (same math, less work): rlfuse runs each distinct prompt once per forward
  (``engine/prefix_share.py``: the G samples read its KV cache); TRL runs every row's prompt. With checkpointing on, both
  checkpoint the layers over the completion tokens; rlfuse's prompt pass (one row per prompt)
  is not checkpointed.
* ``--rlfuse-no-grad-ckpt``: checkpointing off in rlfuse only (TRL keeps it on): rlfuse then trades
  the recomputation for memory bounded by micro-batching.
* micro-batches: rlfuse splits the update into ``ppo.micro_batch_size`` rows of whole prompt groups
  per forward/backward (one optimizer step on the same gradient); TRL runs the whole batch.
  ``--micro-batch N`` sets it (0: the whole minibatch).

Reported per engine: median over steps (the first, warm-up step excluded) of the step time, split
into "rollout" (generation + scoring: TRL's ``_generate_and_score_completions``, rlfuse's
``rollout_time_s``) and "update" (the rest), the process CPU seconds per step (one thread: robust to
other load on a shared machine, read it next to the wall time), and the peak RSS growth during
training above the RSS once the model (with its LoRA) is loaded. Median over repeats of each.

    python benchmarks/bench_e2e.py                         # random 12M Llama, P=4 G=4 L=32
    python benchmarks/bench_e2e.py --model smollm2 --repeats 2
    pytest benchmarks/bench_e2e.py --benchmark-only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENGINES = ("trl", "rlfuse")
LORA_R, LORA_ALPHA, LR, BETA = 8, 16, 1e-4, 0.04


def digit_reward(prompts=None, completions=None, **_):
    """The rule reward of both engines: share of digits in the completion text."""
    out = []
    for c in completions:
        text = c if isinstance(c, str) else "".join(m.get("content", "") for m in c)  # TRL conversational
        out.append(sum(ch.isdigit() for ch in text) / max(1, len(text)))
    return out


def _prompts(n: int) -> list[str]:
    return [f"What's {i % 17}+{(i * 7) % 23}?" for i in range(n)]


def prepare_model(name: str, directory: str) -> str:
    """A saved HF model + tokenizer directory both engines load."""
    if name == "smollm2":
        from rlfuse.engine.demo import dequantized_copy, find_smollm2_gguf

        return dequantized_copy(find_smollm2_gguf())[0]
    from rlfuse.engine import tiny

    tok = tiny.build_tokenizer()
    model = tiny.build_model(tok, name)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


# ------------------------------------------------------------------------- memory probe

def _rss_status() -> dict[str, int]:
    from rlfuse.benchmarks.measure import _proc_status  # the suite's VmRSS / VmHWM reader

    return _proc_status()


def touch_weights(model) -> None:
    """Read every parameter once: safetensors weights may be memory-mapped and paged in lazily by
    the first forward, which would count the model itself as "growth" (same call in both engines)."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.sum()


def reset_peak() -> int:
    """Reset the peak RSS to the current RSS (Linux clear_refs); returns the current RSS."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss_status()["VmRSS"]


def peak_growth_mb(base: int) -> float:
    return max(0, _rss_status()["VmHWM"] - base) / 2**20


# ------------------------------------------------------------------------- the two engines

def _median_step_cpu(marks: list[float]) -> float:
    """Median CPU seconds per step from the CPU clock at start + each step's end (warm-up step excluded)."""
    per_step = [b - a for a, b in zip(marks, marks[1:])]
    return statistics.median(per_step[1:] if len(per_step) > 1 else per_step)


def run_rlfuse(a) -> dict:
    import dataclasses

    import torch

    import rlfuse.engine.metrics as metrics
    import rlfuse.engine.ppo as ppo
    from rlfuse.engine.backbone import Backbone
    from rlfuse.engine.config import ModelConfig, PPOConfig, RunConfig

    Backbone.eos_token_ids = lambda self: []  # benchmark only: exactly L tokens per row (see module doc)
    with tempfile.TemporaryDirectory(prefix="rlfuse-e2e-") as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in _prompts(a.P * (a.steps + 1))))
        cfg = RunConfig(run_dir=str(Path(tmp) / "run"), device="cpu", progress=False, save_every=10_000,
                        sample_every=10_000,
                        model=ModelConfig(name_or_path=a.model_dir, lora_r=LORA_R, lora_alpha=LORA_ALPHA,
                                          lora_target_modules="all-linear",
                                          gradient_checkpointing=a.grad_ckpt and a.rlfuse_grad_ckpt),
                        ppo=dataclasses.replace(PPOConfig(), prompts=str(prompts), advantage="grpo",
                                                batch_size=a.P, n_samples=a.G, max_new_tokens=a.L,
                                                ppo_epochs=1, minibatch_size=a.P * a.G, lr=LR, kl_coef=BETA,
                                                kl_in_loss=True, kl_estimator="k3", loss_agg="token-mean",
                                                temperature=1.0, max_steps=a.steps, max_prompt_length=256,
                                                **({} if a.micro_batch is None else
                                                   {"micro_batch_size": a.micro_batch or None})))
        base = {}
        build = ppo.build_ppo_backbone

        def build_and_reset(*args, **kw):  # the peak counts from here: model + LoRA loaded
            out = build(*args, **kw)
            touch_weights(out[0].model)
            base["rss"] = reset_peak()
            metrics._PROCESS_PEAK[0] = 0.0  # the engine resets the kernel's peak per phase and folds it in here
            return out

        ppo.build_ppo_backbone = build_and_reset
        rows = []
        torch.manual_seed(0)
        cpu = [time.process_time()]  # process CPU time at each step's end: robust to other load on the machine
        ppo.train_ppo(cfg, reward_fn=digit_reward,
                      callbacks=[lambda stage, step, m: rows.append(dict(m)) or cpu.append(time.process_time())])
        peak = max(0.0, metrics.process_peak_rss_mb() - base["rss"] / 2**20)
    steps = rows[1:] if len(rows) > 1 else rows
    return {"step_s": statistics.median(r["step_time_s"] for r in steps),
            "rollout_s": statistics.median(r["rollout_time_s"] for r in steps),
            "update_s": statistics.median(r["step_time_s"] - r["rollout_time_s"] for r in steps),
            "step_cpu_s": _median_step_cpu(cpu),
            "peak_growth_mb": peak, "loaded_rss_mb": base["rss"] / 2**20,
            "response_length": statistics.median(r["response_length"] for r in steps)}


def run_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in _prompts(a.P * (a.steps + 1))]})
    with tempfile.TemporaryDirectory(prefix="trl-e2e-") as out_dir:
        args = GRPOConfig(output_dir=out_dir, max_steps=a.steps, per_device_train_batch_size=a.P * a.G,
                          num_generations=a.G, max_completion_length=a.L, generation_kwargs={"min_new_tokens": a.L},
                          learning_rate=LR, beta=BETA, loss_type="dapo", temperature=1.0, top_k=0, top_p=1.0,
                          logging_steps=1, report_to="none", use_cpu=True, bf16=False, fp16=False,
                          save_strategy="no", seed=0, disable_dropout=True, num_iterations=1,
                          gradient_checkpointing=a.grad_ckpt)
        lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
                          task_type="CAUSAL_LM")
        trainer = GRPOTrainer(model=model, reward_funcs=digit_reward, args=args, train_dataset=data,
                              processing_class=tok, peft_config=lora)
        rollout_times = []
        inner = trainer._generate_and_score_completions

        def timed(*args, **kw):
            t0 = time.perf_counter()
            out = inner(*args, **kw)
            rollout_times.append(time.perf_counter() - t0)
            return out

        trainer._generate_and_score_completions = timed
        from transformers import TrainerCallback

        class _StepCpu(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                cpu.append(time.process_time())

        trainer.add_callback(_StepCpu())
        touch_weights(trainer.model)
        base = reset_peak()
        cpu = [time.process_time()]
        trainer.train()
        peak = peak_growth_mb(base)
    step_times = [row["step_time"] for row in trainer.state.log_history if "step_time" in row]
    n = min(len(step_times), len(rollout_times))
    pairs = list(zip(step_times[:n], rollout_times[:n]))
    pairs = pairs[1:] if len(pairs) > 1 else pairs
    lengths = [row["completions/mean_length"] for row in trainer.state.log_history if "completions/mean_length" in row]
    return {"step_s": statistics.median(s for s, _ in pairs), "rollout_s": statistics.median(r for _, r in pairs),
            "update_s": statistics.median(s - r for s, r in pairs), "step_cpu_s": _median_step_cpu(cpu),
            "peak_growth_mb": peak,
            "loaded_rss_mb": base / 2**20, "response_length": statistics.median(lengths) if lengths else None}


# ------------------------------------------------------------------------- driver

def _spawn(a, engine: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", engine, "--model-dir", a.model_dir,
           "--P", str(a.P), "--G", str(a.G), "--L", str(a.L), "--steps", str(a.steps), "--threads", str(a.threads)]
    cmd += [] if a.grad_ckpt else ["--no-grad-ckpt"]
    cmd += [] if a.rlfuse_grad_ckpt else ["--rlfuse-no-grad-ckpt"]
    cmd += [] if a.micro_batch is None else ["--micro-batch", str(a.micro_batch)]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(a) -> dict:
    runs: dict[str, list[dict]] = {e: [] for e in ENGINES}
    with tempfile.TemporaryDirectory(prefix="e2e-model-") as d:
        a.model_dir = prepare_model(a.model, d)
        for r in range(a.repeats):
            for engine in (ENGINES if r % 2 == 0 else ENGINES[::-1]):
                runs[engine].append(_spawn(a, engine))
                print(f"[bench_e2e] repeat {r + 1}/{a.repeats} {engine}: {runs[engine][-1]}", file=sys.stderr)
    med = {e: {k: statistics.median(x[k] for x in runs[e]) for k in ("step_s", "rollout_s", "update_s", "step_cpu_s",
                                                                        "peak_growth_mb", "loaded_rss_mb")}
           for e in ENGINES}
    return {"model": a.model, "P": a.P, "G": a.G, "L": a.L, "steps": a.steps, "repeats": a.repeats,
            "gradient_checkpointing": a.grad_ckpt, "rlfuse_gradient_checkpointing": a.grad_ckpt and a.rlfuse_grad_ckpt,
            "micro_batch": a.micro_batch,
            "threads": a.threads, "median": med, "runs": runs,
            "speedup_step": med["trl"]["step_s"] / med["rlfuse"]["step_s"],
            "speedup_cpu": med["trl"]["step_cpu_s"] / med["rlfuse"]["step_cpu_s"],
            "memory_growth_ratio": med["rlfuse"]["peak_growth_mb"] / max(1e-9, med["trl"]["peak_growth_mb"]),
            "load_1min": os.getloadavg()[0], "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_results(res: dict, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    ckpt = "" if res["gradient_checkpointing"] else "-nockpt"
    both = res.get("rlfuse_gradient_checkpointing", res["gradient_checkpointing"]) == res["gradient_checkpointing"]
    ckpt += "" if both else "-rlfuse-nockpt"
    ckpt_cell = ("on" if res["gradient_checkpointing"] else "off") if both else "TRL on, rlfuse off"
    (out / f"e2e-{res['model']}-P{res['P']}G{res['G']}L{res['L']}{ckpt}.json").write_text(json.dumps(res, indent=1) + "\n")
    t, r = res["median"]["trl"], res["median"]["rlfuse"]
    line = (f"| {res['model']} | {res['P']}x{res['G']}x{res['L']} | {ckpt_cell} | {t['step_s']:.2f} ({t['rollout_s']:.2f} + "
            f"{t['update_s']:.2f}) | {r['step_s']:.2f} ({r['rollout_s']:.2f} + {r['update_s']:.2f}) | "
            f"**{res['speedup_step']:.2f}x** (CPU {res.get('speedup_cpu', float('nan')):.2f}x) | {t['peak_growth_mb']:.0f} | {r['peak_growth_mb']:.0f} | "
            f"**{res['memory_growth_ratio']:.2f}x** | {res['repeats']} | {res['load_1min']:.1f} | {res['measured_at']} |")
    md = out / "e2e.md"
    if not md.exists():
        md.write_text(
            "# One GRPO step: rlfuse vs TRL GRPOTrainer, identical work\n\n"
            "`python benchmarks/bench_e2e.py` (AMD EPYC, 2 cores, shared: load = 1-min load average). Each engine "
            "in a fresh process, interleaved; per run the median over steps (warm-up step excluded), then the "
            "median over repeats. Step = rollout (generation + scoring) + update, seconds. Memory = peak RSS "
            "growth during training above the RSS with the model and LoRA loaded (every weight read once, so lazily mapped weights count as loaded), MiB. Same saved model, prompts, "
            "rule reward, LoRA (r=8, alpha=16, all-linear), gradient checkpointing as the column says, AdamW lr 1e-4, KL to the base in the loss (beta=0.04, "
            "k3), one optimisation pass per step, token-mean loss. Differences: exactly L tokens are forced by "
            "min_new_tokens in TRL (EOS banned until L) and by turning EOS stopping off in rlfuse (EOS an ordinary "
            "token); each engine draws its own prompt order; samplers differ (rlfuse's exact sampler vs "
            "model.generate); rlfuse shares each prompt's forward among its samples and micro-batches the update "
            "(see the script's docstring). TRL/rlfuse: wall time (CPU time per step).\n\n"
            "| model | P x G x L | grad. ckpt | TRL step (rollout + update) | rlfuse step (rollout + update) | TRL/rlfuse | "
            "TRL mem | rlfuse mem | rlfuse/TRL mem | repeats | load | measured |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    with md.open("a") as f:
        f.write(line + "\n")
    return line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-small", help="tiny-small (random ~12M Llama), tiny, or smollm2")
    p.add_argument("--P", type=int, default=4, help="prompts per step")
    p.add_argument("--G", type=int, default=4, help="samples per prompt")
    p.add_argument("--L", type=int, default=32, help="new tokens per sample (exactly)")
    p.add_argument("--steps", type=int, default=4, help="GRPO steps per run (the first is a warm-up)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false",
                   help="gradient checkpointing off in both (default on in both: TRL 1.16's GRPOConfig default)")
    p.add_argument("--rlfuse-no-grad-ckpt", dest="rlfuse_grad_ckpt", action="store_false",
                   help="gradient checkpointing off in rlfuse only (its micro-batched update bounds the memory)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="rlfuse's ppo.micro_batch_size (default: the engine's; 0: the whole minibatch)")
    p.add_argument("--out", default=str(HERE / "results" / "cpu-amd-epyc-2c"))
    p.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        import torch

        torch.set_num_threads(a.threads)
        print(json.dumps({"trl": run_trl, "rlfuse": run_rlfuse}[a.child](a)))
        return 0
    line = write_results(run(a), Path(a.out))
    print(line)
    return 0


def test_e2e_grpo_step_rlfuse_vs_trl(benchmark, tmp_path):
    """pytest-benchmark entry: one interleaved pair of fresh-process runs on the tiny model."""
    a = argparse.Namespace(model="tiny", P=2, G=2, L=8, steps=2, repeats=1, threads=1, grad_ckpt=True, rlfuse_grad_ckpt=True, micro_batch=None)
    res = benchmark.pedantic(run, args=(a,), rounds=1, iterations=1)
    assert res["median"]["rlfuse"]["step_s"] > 0 and res["median"]["trl"]["step_s"] > 0
    write_results(res, tmp_path)


if __name__ == "__main__":
    sys.exit(main())
