"""TRL 1.x with and without ``rlfuse.integrations.trl.patch()``: step time and peak memory.

TRL's own fused LM head (``add_fused_lm_head`` -> ``trl.kernels.ChunkedLogProbFunction``) is
the bar: the patch must not be slower or hungrier. Three measurements, on a tiny random
Llama with a real vocabulary (V = 32000, hidden 256, 2 layers):

* ``head``: the kernel alone, ``ChunkedLogProbFunction.apply`` vs ``RlfuseChunkedLogProb.apply``
  on [N, H] hidden states, forward + backward with entropy;
* ``step``: the trainer's scoring step, ``model(..., labels=..., fused_lm_head=True)`` ->
  GRPO-style loss -> backward, on a [B, T] batch;
* ``grpo``: real ``GRPOTrainer`` steps (generation + scoring + update), TRL's ``step_time``.

Each (repeat, engine) a fresh process, plain and patched interleaved: each measurement's first
call is a warm-up, its second is read by the one meter (peak memory above what was resident
before it), then the median of ``timed`` more calls.

    rlfuse bench --scenarios trl_patch [--quick]
"""

from __future__ import annotations

import statistics
import time

from .spec import RunScenario

VOCAB, HIDDEN, LAYERS = 32000, 256, 2


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


def _measure(fn, mode, timed: int) -> tuple[float, float]:
    """(median seconds, peak extra MiB) of ``fn(mode)``: a warm-up call, one under the meter, then ``timed``."""
    from rlfuse.engine.memory import PeakMeter

    fn(mode)
    meter = PeakMeter("cpu")
    meter.start()
    t0 = time.perf_counter()
    fn(mode)
    times = [time.perf_counter() - t0]
    peak = meter.peak_extra() / 2**20
    for _ in range(timed - 1):
        t0 = time.perf_counter()
        fn(mode)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), peak


def grpo_steps(size, mode) -> dict:
    """A few real GRPOTrainer steps; TRL's step_time (warm-up step excluded) and the peak memory."""
    import tempfile

    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from rlfuse.engine.memory import PeakMeter

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
        meter = PeakMeter("cpu")
        meter.start()
        trainer.train()
    steps = [row["step_time"] for row in trainer.state.log_history if "step_time" in row]
    return {"grpo_step_s": statistics.median(steps[1:] or steps), "grpo_peak_mb": meter.peak_extra() / 2**20}


class TrlPatchScenario(RunScenario):
    """TRL 1.x plain vs with ``rlfuse.integrations.trl.patch()`` (see ``bench_trl_patch.py``'s
    docstring): the fused head alone, the trainer's scoring step and real GRPOTrainer steps, each
    engine in a fresh process, interleaved; median seconds, peak extra MiB, ratio rlfuse/TRL (below
    1 is better for rlfuse)."""

    op = "trl_patch"
    title = "TRL fused LM head: TRL's own vs rlfuse (rlfuse.integrations.trl.patch())"
    engines = ("trl", "rlfuse")
    metrics = ("head_s", "head_peak_mb", "step_s", "step_peak_mb", "grpo_step_s", "grpo_peak_mb")
    plot_label = "seconds"
    timeout_s = 1800
    sizes_by_preset = {
        "quick": [dict(N=512, B=2, T=128, prompt=32, grpo_steps=2, completion=8, timed=3)],
        "full": [dict(N=2048, B=4, T=256, prompt=64, grpo_steps=3, completion=16, timed=3)],
    }

    def unavailable(self, engine):
        try:
            import trl.kernels  # noqa: F401
        except ImportError as exc:
            return f"needs trl ({exc})"
        return None

    def child(self, engine, size, ctx):
        out = {}
        for case, make in (("head", make_head_case), ("step", make_step_case)):
            fn = make(size)
            _set_mode(engine)
            out[f"{case}_s"], out[f"{case}_peak_mb"] = _measure(fn, engine, size["timed"])
        if size.get("grpo_steps"):
            out.update(grpo_steps(size, engine))
        _set_mode("trl")
        return out

    def finish(self, size, med):
        return {"ratio": {k: med["rlfuse"][k] / med["trl"][k] for k in med["trl"] if med["trl"][k]}}

    def columns(self, res):
        t, r, q = res["median"]["trl"], res["median"]["rlfuse"], res["ratio"]
        cells = [("size", res["label"])]
        for k, name in (("head_s", "kernel fwd+bwd s"), ("step_s", "scoring step s"), ("grpo_step_s", "GRPO step s"),
                        ("head_peak_mb", "kernel MiB"), ("step_peak_mb", "step MiB"), ("grpo_peak_mb", "GRPO MiB")):
            if k in t:
                f = ".3f" if k.endswith("_s") else ".1f"
                cells.append((f"{name} TRL / rlfuse (ratio)", f"{t[k]:{f}} / {r[k]:{f}} (**{q.get(k, 0):.2f}**)"))
        return cells

    def plot_values(self, res):
        return {e: m["step_s"] for e, m in res["median"].items()}


BENCH = TrlPatchScenario()


def test_trl_patch(benchmark):
    """pytest-benchmark entry: the scoring step, patched, at the quick size."""
    import pytest
    pytest.importorskip("trl")
    fn = make_step_case(BENCH.sizes("quick")[0])
    try:
        benchmark.pedantic(fn, args=("rlfuse",), rounds=3, warmup_rounds=1)
    finally:
        _set_mode("trl")
