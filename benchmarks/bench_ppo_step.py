"""ppo_step: one end-to-end PPO iteration (generate, score, update) - tokens/s and peak memory.

  * rlfuse_shared    - rlfuse's engine: ONE base model with LoRA adapters policy / sft
                       (reference) / reward plus value and reward heads
                       (``rlfuse.engine.backbone.Backbone``), generation with the policy
                       adapter, ``score_rollout`` (fused ``linear_logprobs``),
                       ``compute_advantages`` (``K.gae`` + ``K.masked_whiten``) and
                       ``ppo_update`` (``K.ppo_loss``);
  * separate_models  - the TRL PPOTrainer / OpenRLHF layout: four separate models (policy,
                       reference, reward, value), each a full copy of the base, unfused
                       log-probs from ``model(...).logits``, the Python-loop GAE and the
                       eager PPO loss (``baselines.SeparateModelsPPO``).

Same base model (a random-weight Llama: hidden 256, 4 layers, vocab 32000 on CPU), same
LoRA (r=8, all linear layers), same prompts, same sampling, one PPO epoch over the batch,
AdamW on both sides. Peak memory here INCLUDES the models: it is counted from before they
were built, since one copy of the base versus four is most of the difference.
"""

from __future__ import annotations

from . import baselines as B
from .measure import current_memory
from .spec import OpBench

KL_COEF = 0.05


def _model_config(size):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=size["V"], hidden_size=size["H"], intermediate_size=size["H"] * 8 // 3 // 16 * 16,
                       num_hidden_layers=size["L"], num_attention_heads=max(1, size["H"] // 64),
                       num_key_value_heads=max(1, size["H"] // 64), max_position_embeddings=4096,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def _make_base(size, device, dtype):
    """A fresh copy of the same random-weight base model (fixed seed) on ``device``."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = LlamaForCausalLM(_model_config(size))
    model.config._attn_implementation = "sdpa"
    model = model.to(device=device, dtype=dtype)
    model.requires_grad_(False)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    return model


def _lora_config():
    from peft import LoraConfig
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", bias="none",
                      task_type="CAUSAL_LM")


class _TokenizerStub:
    """What Backbone.generate needs from a tokenizer: pad and EOS ids (the benchmark
    feeds token ids directly, so nothing is encoded or decoded)."""
    pad_token_id = 0
    eos_token_id = 2


class SharedBackboneStep:
    """One PPO iteration through rlfuse's engine API on one shared backbone."""

    def __init__(self, size, device, dtype, base=None, quantized: bool = False):
        import torch
        from peft import get_peft_model

        from rlfuse.engine.backbone import Backbone
        from rlfuse.engine.config import PPOConfig
        from rlfuse.engine.optim import make_optimizer

        base = base if base is not None else _make_base(size, device, dtype)
        model = get_peft_model(base, _lora_config(), adapter_name="policy")
        self.bb = Backbone(model, _TokenizerStub(), str(device), _lora_config(), size["H"], quantized=quantized)
        for name in ("sft", "reward"):
            self.bb.add_adapter(name)
        self.bb.reference_adapter = "sft"
        self.bb.set_trainable(["policy"])
        self.bb.reward_head.requires_grad_(False)
        params = self.bb.adapter_parameters("policy") + list(self.bb.value_head.parameters())
        self.opt = make_optimizer(params, lr=1e-4, device=str(device), kind="adamw")
        self.cfg = PPOConfig(ppo_epochs=1, minibatch_size=size["B"], kl_coef=KL_COEF, kl_in_loss=False,
                             max_new_tokens=size["R"], batch_size=size["B"])
        self.torch = torch

    def _clock(self):
        import time
        if self.bb.device.type == "cuda":
            self.torch.cuda.synchronize(self.bb.device)
        return time.perf_counter()

    def step(self, prompt_ids):
        """One iteration; returns the response tokens, the loss and each phase's seconds."""
        from rlfuse.engine.advantages import compute_advantages
        from rlfuse.engine.ppo import ppo_update
        from rlfuse.engine.rollout import Rollout, score_rollout
        from rlfuse.engine.step_values import UpdateBatch

        torch = self.torch
        bb, c = self.bb, self.cfg
        P = prompt_ids.shape[1]
        attn = torch.ones_like(prompt_ids)
        t0 = self._clock()
        out = bb.generate(prompt_ids, attn, max_new_tokens=c.max_new_tokens, temperature=1.0, adapter="policy")
        completion = out[:, P:]
        t1 = self._clock()
        resp = B.response_mask_after_eos(completion, bb.eos_token_ids())
        completion = completion.masked_fill(resp == 0, bb.tokenizer.pad_token_id)
        ro = Rollout(input_ids=torch.cat([prompt_ids, completion], 1), attention_mask=torch.cat([attn, resp], 1),
                     prompt_len=P, response_mask=resp.float(), prompts=[""] * len(prompt_ids),
                     completions=[""] * len(prompt_ids))
        score_rollout(bb, ro, temperature=1.0, reward_fn=None, with_values=True, batch_size=len(prompt_ids))
        adv, ret = compute_advantages(ro, estimator="gae", n_samples=1, kl_coef=KL_COEF, kl_in_loss=False,
                                      gamma=c.gamma, lam=c.lam, whiten=True)
        t2 = self._clock()
        stats = ppo_update(bb, self.opt, UpdateBatch.of(ro, adv, ret), c).stats  # gae: the KL is in the reward
        t3 = self._clock()
        return {"tokens": int(ro.response_mask.sum()), "loss": stats.get("loss"), "generate_s": t1 - t0,
                "generated_tokens": int(completion.numel()), "score_s": t2 - t1, "update_s": t3 - t2}


class PpoStepBench(OpBench):
    op = "ppo_step"
    title = "end-to-end PPO iteration (generate + score + update)"
    modes = ("step",)
    primary = "rlfuse_shared"
    baselines = ("separate_models",)
    setup_per_impl = True
    x_key = "B"
    x_label = "batch (prompts)"
    timeout_s = 1200
    descriptions = {
        "rlfuse_shared": "rlfuse engine: one base + LoRA adapters (policy/sft/reward) + heads, fused log-probs, "
                         "K.gae, K.ppo_loss",
        "separate_models": "four separate full models (policy, reference, reward, value), model(...).logits + "
                           "log_softmax/gather, Python-loop GAE, eager PPO loss",
    }
    sizes_by_preset = {
        "target": [dict(H=256, L=4, V=32000, B=8, P=64, R=64, dtype="float32")],
        "quick": [dict(H=256, L=4, V=32000, B=2, P=16, R=16, dtype="float32")],
        "full": [dict(H=256, L=4, V=32000, B=8, P=32, R=48, dtype="float32")],
        "gpu": [dict(H=1024, L=8, V=32000, B=32, P=128, R=256, dtype="bfloat16")],
    }

    def kind(self, impl):
        return "rlfuse" if impl == self.primary else "baseline"

    def unavailable(self, impl, device):
        try:
            import peft  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as exc:
            return f"needs transformers and peft ({exc})"
        if impl == self.primary:
            try:
                import rlfuse.engine.backbone  # noqa: F401
                import rlfuse.engine.ppo  # noqa: F401
            except Exception as exc:  # noqa: BLE001
                return f"rlfuse.engine not importable ({type(exc).__name__}: {exc})"
        return None

    def setup_for(self, impl, size, device):
        import torch
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[size.get("dtype", "float32")]
        # import everything first, so the memory counted from here is models + step only
        import peft  # noqa: F401
        import transformers  # noqa: F401
        from transformers import LlamaForCausalLM  # noqa: F401
        if impl == self.primary:
            import rlfuse.engine.advantages  # noqa: F401
            import rlfuse.engine.backbone  # noqa: F401
            import rlfuse.engine.ppo  # noqa: F401
            import rlfuse.engine.rollout  # noqa: F401
        base = current_memory(device)
        g = torch.Generator(device="cpu").manual_seed(0)
        prompts = torch.randint(10, size["V"], (size["B"], size["P"]), generator=g).to(device)
        if impl == self.primary:
            runner = SharedBackboneStep(size, device, dtype)
        else:
            runner = B.SeparateModelsPPO(lambda: _make_base(size, device, dtype), _lora_config(), kl_coef=KL_COEF)
        torch.manual_seed(0)
        return {"prompts": prompts, "runner": runner, "_memory_base": base, "size": size}

    def input_bytes(self, inp):
        return inp["prompts"].numel() * 8

    def make(self, impl, inp, mode, backend):
        import contextlib
        runner, prompts, R = inp["runner"], inp["prompts"], inp["size"]["R"]
        rl = impl == self.primary

        def run():
            if rl:
                import rlfuse.kernels as K
                ctx = K.use_backend(backend)
            else:
                ctx = contextlib.nullcontext()
            with ctx:
                if rl:
                    return runner.step(prompts)
                return runner.step(prompts, R)
        return run

    def extras(self, impl, inp, mode, time_s, device):
        """Tokens/s, and the step's matmul floor: one more step with its weight matmuls counted
        (``roofline.MatmulFloor``), then timed alone; ``matmul_floor_fraction`` = floor / time."""
        import torch

        from .roofline import MatmulFloor
        s, runner = inp["size"], inp["runner"]
        models = [runner.bb.model] if impl == self.primary else \
            [m for m in vars(runner).values() if isinstance(m, torch.nn.Module)]
        with MatmulFloor(*models) as mf:
            self.make(impl, inp, mode, "auto")()
        f = mf.floor()
        return {"tokens_per_s": s["B"] * (s["P"] + s["R"]) / time_s,
                "generated_tokens_per_s": s["B"] * s["R"] / time_s,
                "matmul_gflop": f["gflop"], "matmul_floor_s": f["floor_s"], "matmul_floor_fraction": f["floor_s"] / time_s}


BENCH = PpoStepBench()


def test_ppo_step(benchmark, bench_case):
    from .pytest_bridge import run_benchmark
    run_benchmark(benchmark, bench_case)
