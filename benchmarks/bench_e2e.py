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

Each engine's matmul floor (``roofline.MatmulFloor``: its weight matmuls alone at the shapes it
ran, per step) and the fraction of it it reaches are reported beside the times.

    rlfuse bench --scenarios e2e                                   # random 12M Llama, P=4 G=4 L=32
    rlfuse bench --scenarios e2e --sizes e2e:model=smollm2 --repeats 2
    rlfuse bench --scenarios e2e --sizes e2e:grad_ckpt=0 e2e:dtype=bfloat16
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from .roofline import MatmulFloor
from .spec import RunScenario, floor_cell, fraction

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
        from .baselines import smollm2_dir

        return smollm2_dir()
    from rlfuse.engine import tiny

    tok = tiny.build_tokenizer()
    model = tiny.build_model(tok, name)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def touch_weights(model) -> None:
    """Read every parameter once: safetensors weights may be memory-mapped and paged in lazily by
    the first forward, which would count the model itself as "growth" (same call in both engines)."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.sum()


def _lora_dtype(model) -> str:
    """The dtype(s) of a peft model's LoRA weights (both engines keep them float32 over a bf16 base)."""
    return ",".join(sorted({str(p.dtype).removeprefix("torch.") for n, p in model.named_parameters() if "lora_" in n}))


def _median_step_cpu(marks: list[float]) -> float:
    """Median CPU seconds per step from the CPU clock at start + each step's end (warm-up step excluded)."""
    per_step = [b - a for a, b in zip(marks, marks[1:])]
    return statistics.median(per_step[1:] if len(per_step) > 1 else per_step)


def _floor(counter: MatmulFloor, steps: int) -> dict:
    f = counter.floor(scale=1.0 / max(1, steps))
    return {"matmul_gflop": f["gflop"], "matmul_floor_s": f["floor_s"]}


def run_rlfuse(a) -> dict:
    import dataclasses

    import torch

    import rlfuse.engine.ppo as ppo
    from rlfuse.engine.backbone import Backbone
    from rlfuse.engine.memory import PeakMeter
    from rlfuse.engine.config import ModelConfig, PPOConfig, RunConfig

    Backbone.eos_token_ids = lambda self: []  # benchmark only: exactly L tokens per row (see module doc)
    with tempfile.TemporaryDirectory(prefix="rlfuse-e2e-") as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in _prompts(a.P * (a.steps + 1))))
        cfg = RunConfig(run_dir=str(Path(tmp) / "run"), device="cpu", progress=False, save_every=10_000,
                        sample_every=10_000,
                        model=ModelConfig(name_or_path=a.model_dir, lora_r=LORA_R, lora_alpha=LORA_ALPHA,
                                          lora_target_modules="all-linear", dtype=a.dtype,
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
            base["lora_dtype"] = _lora_dtype(out[0].model)
            base["floor"] = MatmulFloor(out[0].model).__enter__()
            base["meter"] = PeakMeter("cpu")
            base["rss"] = base["meter"].start()
            return out

        ppo.build_ppo_backbone = build_and_reset
        rows = []
        torch.manual_seed(0)
        cpu = [time.process_time()]  # process CPU time at each step's end: robust to other load on the machine
        ppo.train_ppo(cfg, reward_fn=digit_reward,
                      callbacks=[lambda stage, step, m: rows.append(dict(m)) or cpu.append(time.process_time())])
        peak = base["meter"].peak_extra() / 2**20
        base["floor"].__exit__(None, None, None)
    steps = rows[1:] if len(rows) > 1 else rows
    return {"step_s": statistics.median(r["step_time_s"] for r in steps),
            "dtype": a.dtype, "lora_dtype": base["lora_dtype"],
            "rollout_s": statistics.median(r["rollout_time_s"] for r in steps),
            "update_s": statistics.median(r["step_time_s"] - r["rollout_time_s"] for r in steps),
            "step_cpu_s": _median_step_cpu(cpu),
            "peak_growth_mb": peak, "loaded_rss_mb": base["rss"] / 2**20,
            "response_length": statistics.median(r["response_length"] for r in steps),
            **_floor(base["floor"], len(rows))}


def run_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from rlfuse.engine.memory import PeakMeter

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # bf16: the weights loaded in bf16, as rlfuse does (bf16=False: no autocast on top of them)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=getattr(torch, a.dtype))
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
        lora_dtype = _lora_dtype(trainer.model)
        meter = PeakMeter("cpu")
        base = meter.start()
        cpu = [time.process_time()]
        with MatmulFloor(trainer.model) as floor:
            trainer.train()
        peak = meter.peak_extra() / 2**20
    step_times = [row["step_time"] for row in trainer.state.log_history if "step_time" in row]
    n = min(len(step_times), len(rollout_times))
    pairs = list(zip(step_times[:n], rollout_times[:n]))
    pairs = pairs[1:] if len(pairs) > 1 else pairs
    lengths = [row["completions/mean_length"] for row in trainer.state.log_history if "completions/mean_length" in row]
    return {"step_s": statistics.median(s for s, _ in pairs), "rollout_s": statistics.median(r for _, r in pairs),
            "dtype": a.dtype, "lora_dtype": lora_dtype,
            "update_s": statistics.median(s - r for s, r in pairs), "step_cpu_s": _median_step_cpu(cpu),
            "peak_growth_mb": peak,
            "loaded_rss_mb": base / 2**20, "response_length": statistics.median(lengths) if lengths else None,
            **_floor(floor, a.steps)}


class E2EScenario(RunScenario):
    """One GRPO step, rlfuse vs TRL 1.x ``GRPOTrainer``, the same work (see ``bench_e2e.py``'s
    docstring). Each engine in a fresh process, interleaved; per run the median over steps (warm-up
    step excluded), then the median over repeats. Step = rollout (generation + scoring) + update,
    seconds (CPU seconds per step beside the ratio). Memory = peak RSS growth during training above
    the RSS with the model and LoRA loaded, MiB. Floor = each engine's weight matmuls alone at the
    shapes it ran, per step; "% of floor" = floor / step time."""

    op = "e2e"
    title = "One GRPO step: rlfuse vs TRL GRPOTrainer, identical work"
    engines = ("trl", "rlfuse")
    metrics = ("step_s", "rollout_s", "update_s", "step_cpu_s", "peak_growth_mb", "loaded_rss_mb",
               "matmul_gflop", "matmul_floor_s")
    plot_label = "seconds per GRPO step"
    timeout_s = 3600
    _base = dict(model="tiny-small", P=4, G=4, L=32, steps=4, grad_ckpt=1, rlfuse_grad_ckpt=1, micro_batch=-1,
                 dtype="float32")
    sizes_by_preset = {"quick": [dict(_base, model="tiny", P=2, G=2, L=8, steps=2)], "full": [_base],
                       "target": [_base], "gpu": [dict(_base, model="smollm2")]}

    def prepare(self, size, workdir):
        return {"model_dir": prepare_model(size["model"], workdir)}

    def child(self, engine, size, ctx):
        import torch

        a = SimpleNamespace(**size, model_dir=ctx["model_dir"], threads=torch.get_num_threads())
        a.grad_ckpt, a.rlfuse_grad_ckpt = bool(a.grad_ckpt), bool(a.rlfuse_grad_ckpt)
        a.micro_batch = None if a.micro_batch == -1 else a.micro_batch
        return (run_trl if engine == "trl" else run_rlfuse)(a)

    def finish(self, size, med):
        t, r = med["trl"], med["rlfuse"]
        out = {"speedup_step": t["step_s"] / r["step_s"], "speedup_cpu": fraction(t.get("step_cpu_s"), r.get("step_cpu_s")),
               "memory_growth_ratio": r["peak_growth_mb"] / max(1e-9, t["peak_growth_mb"])}
        for e in self.engines:
            med[e]["floor_fraction"] = fraction(med[e].get("matmul_floor_s"), med[e]["step_s"])
        return out

    def stem(self, res):
        s = res["size"]
        ckpt = ("" if s["grad_ckpt"] else "-nockpt") + ("-rlfuse-nockpt" if s["grad_ckpt"] and not s["rlfuse_grad_ckpt"]
                                                          else "")
        return f"e2e-{s['model']}-P{s['P']}G{s['G']}L{s['L']}{ckpt}" + ("" if s["dtype"] == "float32" else f"-{s['dtype']}")

    def columns(self, res):
        s, t, r = res["size"], res["median"]["trl"], res["median"]["rlfuse"]
        both = bool(s["rlfuse_grad_ckpt"]) or not s["grad_ckpt"]
        return [("model", s["model"] if s["dtype"] == "float32" else f"{s['model']} ({s['dtype']}, both)"),
                ("P x G x L", f"{s['P']}x{s['G']}x{s['L']}"),
                ("grad. ckpt", ("on" if s["grad_ckpt"] else "off") if both else "TRL on, rlfuse off"),
                ("TRL step (rollout + update)", f"{t['step_s']:.2f} ({t['rollout_s']:.2f} + {t['update_s']:.2f})"),
                ("rlfuse step (rollout + update)", f"{r['step_s']:.2f} ({r['rollout_s']:.2f} + {r['update_s']:.2f})"),
                ("TRL/rlfuse", f"**{res['speedup_step']:.2f}x**" + ("" if res.get("speedup_cpu") is None else
                                                                    f" (CPU {res['speedup_cpu']:.2f}x)")),
                ("TRL floor (% of it)", floor_cell(t, "step_s")), ("rlfuse floor (% of it)", floor_cell(r, "step_s")),
                ("TRL mem", f"{t['peak_growth_mb']:.0f}"), ("rlfuse mem", f"{r['peak_growth_mb']:.0f}"),
                ("rlfuse/TRL mem", f"**{res['memory_growth_ratio']:.2f}x**")]

    def plot_values(self, res):
        return {e: m["step_s"] for e, m in res["median"].items()}


BENCH = E2EScenario()


def test_e2e_grpo_step_rlfuse_vs_trl(benchmark):
    """pytest-benchmark entry: one interleaved pair of fresh-process runs at the quick size."""
    from .measure import ChildPool

    size = BENCH.sizes("quick")[0]
    pool = ChildPool()

    def both():
        with tempfile.TemporaryDirectory() as d:
            ctx = BENCH.prepare(size, d)
            return {e: pool.run(dict(job="run", op="e2e", engine=e, size=size, ctx=ctx, device="cpu", threads=1))
                    for e in BENCH.engines}

    res = benchmark.pedantic(both, rounds=1, iterations=1)
    assert all(r["status"] == "ok" and r["metrics"]["step_s"] > 0 for r in res.values()), res
