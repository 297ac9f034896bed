"""bf16 on the CPU (issue 22): model.dtype=auto picks bf16 where the CPU multiplies bf16 natively,
the frozen base is bf16 while adapters, heads, optimizer state, log-probs and losses stay float32,
and the sampler and the update still see the policy the scorer scored."""

import json

import pytest
import torch

from rlfuse.engine import backbone as backbone_mod
from rlfuse.engine.backbone import cpu_info, load_backbone, resolve_dtype
from rlfuse.engine.config import ModelConfig, load_config
from rlfuse.engine.data import Prompt
from rlfuse.engine.optim import make_optimizer
from rlfuse.engine.ppo import train_ppo
from rlfuse.engine.rollout import generate_rollout, score_rollout

BF16 = ModelConfig(dtype="bfloat16")


@pytest.fixture
def detect(monkeypatch):
    """Run model.dtype=auto's CPU detection on a faked CPU (the suite's RLFUSE_CPU_BF16=0 lifted)."""
    monkeypatch.delenv("RLFUSE_CPU_BF16", raising=False)

    def fake(flags, vendor="AuthenticAMD"):
        monkeypatch.setattr(backbone_mod, "cpu_info", lambda cpuinfo="/proc/cpuinfo": (vendor, set(flags)))

    return fake


# ----------------------------------------------------------------------------- the choice

@pytest.mark.parametrize("vendor,flags,dtype", [
    ("AuthenticAMD", {"avx512f", "avx512_bf16"}, torch.bfloat16),  # Zen 4/5: bf16 dot = 2 fp32 FMAs
    ("GenuineIntel", {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, torch.bfloat16),  # Sapphire Rapids+
    ("GenuineIntel", {"avx512f", "avx512_bf16"}, torch.float32),  # no AMX: bf16 peak = fp32 peak, measured slower
    ("AuthenticAMD", {"avx512f", "avx512bw", "avx512_vnni"}, torch.float32),  # Zen 3 class: no bf16 dot
    ("GenuineIntel", {"avx2", "fma"}, torch.float32),
    ("", set(), torch.float32),  # no /proc/cpuinfo
])
def test_auto_is_bf16_exactly_where_bf16_multiplies_faster(detect, vendor, flags, dtype):
    detect(flags, vendor)
    got, why = resolve_dtype("auto", "cpu")
    assert got == dtype
    named = sorted(flags & {"avx512_bf16", "amx_bf16"})
    assert named[:1] == [] or named[0] in why
    assert why.startswith("auto: float32" if dtype == torch.float32 else "auto: bf16")


def test_explicit_dtypes_and_the_override(detect, monkeypatch):
    detect({"avx512_bf16"})
    assert resolve_dtype("float32", "cpu") == (torch.float32, "model.dtype=float32")
    assert resolve_dtype("bf16", "cpu")[0] == torch.bfloat16
    monkeypatch.setenv("RLFUSE_CPU_BF16", "0")
    assert resolve_dtype("auto", "cpu")[0] == torch.float32
    detect(set())
    monkeypatch.setenv("RLFUSE_CPU_BF16", "1")
    assert resolve_dtype("auto", "cpu")[0] == torch.bfloat16
    with pytest.raises(ValueError, match="model.dtype"):
        resolve_dtype("int8", "cpu")


def test_cpu_info_reads_the_vendor_and_flags_lines(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: Some CPU\n"
                    "flags\t\t: fpu avx2 avx512f avx512_bf16\n\nprocessor\t: 1\nvendor_id\t: AuthenticAMD\n"
                    "flags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert cpu_info(str(info)) == ("AuthenticAMD", {"fpu", "avx2", "avx512f", "avx512_bf16"})
    assert cpu_info(str(tmp_path / "absent")) == ("", set())


# ----------------------------------------------------------------------------- the parts' dtypes

def test_bf16_base_with_float32_adapters_heads_optimizer_and_logprobs(detect):
    detect({"avx512_bf16"})
    bb = load_backbone(ModelConfig(), device="cpu", adapters=["policy", "sft"])  # auto
    assert bb.dtype == torch.bfloat16 and "avx512_bf16" in bb.dtype_reason
    lora = {n: p for n, p in bb.model.named_parameters() if ".lora_" in n}
    base = {n: p for n, p in bb.model.named_parameters() if ".lora_" not in n}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    assert base and all(p.dtype == torch.bfloat16 for p in base.values())
    assert bb.lm_head.weight.dtype == torch.bfloat16
    for head in (bb.value_head, bb.reward_head):
        assert all(p.dtype == torch.float32 for p in head.parameters())
    bb.add_adapter("reward")  # added later: float32 as well
    assert all(p.dtype == torch.float32 for p in bb.adapter_parameters("reward"))

    bb.set_trainable(["policy"])
    params = bb.adapter_parameters("policy") + list(bb.value_head.parameters())
    opt = make_optimizer(params, lr=1e-3)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    attn = torch.ones_like(ids)
    with bb.use("policy"):
        hidden = bb.hidden_states(ids, attn)
        logp, ent = bb.token_logprobs(hidden[:, :-1], ids[:, 1:], entropy=True)
        values = bb.value_head(hidden)
    assert hidden.dtype == torch.bfloat16
    assert logp.dtype == ent.dtype == values.dtype == torch.float32
    loss = -(logp.mean()) + values.pow(2).mean()
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    opt.step()
    states = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1]
    assert states and all(t.dtype == torch.float32 for t in states)


def test_the_run_summary_names_the_dtype_and_why(tmp_path, data, detect):
    detect({"avx512_bf16"})
    cfg = load_config(None, {"run_dir": str(tmp_path / "run"), "device": "cpu", "progress": False,
                             "ppo": {"prompts": str(data["prompts"]), "max_steps": 1, "batch_size": 2,
                                     "n_samples": 2, "max_new_tokens": 3}})
    train_ppo(cfg, reward_fn=lambda prompts, completions: [float(len(c)) for c in completions])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["ppo"]["model_dtype"]["dtype"] == "bfloat16"
    assert "avx512_bf16" in summary["ppo"]["model_dtype"]["reason"]


# ----------------------------------------------------------------------------- exactness in bf16

@pytest.fixture(scope="module")
def bb16():
    bb = load_backbone(BF16, device="cpu", adapters=["policy"])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a policy far from the base, so the adapter visibly matters
        for p in bb.adapter_parameters("policy"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return bb


def _prompt(tok, text):
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return Prompt(text, rendered, tok(rendered, add_special_tokens=False)["input_ids"])


def test_bf16_first_token_follows_the_scored_softmax(bb16):
    """The sampler's draws against the distribution the SCORER computes (the fused bf16 head over
    every token of the vocabulary), as tests/engine/test_sampler.py does in float32."""
    tok, T, n = bb16.tokenizer, 0.05, 4000  # the tiny model's logits are flat: a peaked distribution at a low T
    prompt = _prompt(tok, "say red")
    ids = torch.tensor([prompt.input_ids] * n)
    attn = torch.ones_like(ids)
    assert bb16.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad(), bb16.use("policy"):
        h = bb16.hidden_states(ids[:1], attn[:1])[:, -1]
        V = bb16.lm_head.weight.shape[0]
        p = bb16.token_logprobs(h.expand(V, -1), torch.arange(V), temperature=T).exp().double()
    assert abs(float(p.sum()) - 1.0) < 1e-4
    out = bb16.generate(ids, attn, max_new_tokens=1, temperature=T, row_keys=[(0, 0, 0, j) for j in range(n)])
    freq = torch.bincount(out[:, ids.shape[1]], minlength=V).double() / n
    tv = 0.5 * float((freq - p).abs().sum())
    bound = 0.5 * float(torch.sqrt(p / n).sum()) + 0.06  # E[TV] + McDiarmid margin (test_sampler.py)
    assert tv <= bound
    # the test can fail: the 5 likeliest tokens' probabilities swapped with the 5 least likely
    order = p.argsort()
    skewed = p.clone()
    skewed[order[-5:]], skewed[order[:5]] = p[order[:5]], p[order[-5:]]
    assert p[order[-5:]].sum() > 0.3 and 0.5 * float((freq - skewed).abs().sum()) > bound


def test_bf16_sampled_logprobs_match_the_scored_ones_to_bf16_rounding(bb16):
    """The sampler's per-token log-probs come from its own KV-cache decode; scoring recomputes them
    in one forward. In bf16 the two differ by rounding only (here < 2e-2; in float32 < 2e-5)."""
    prompts = [_prompt(bb16.tokenizer, t) for t in ("say red", "a much longer prompt here, with more words", "hi")]
    ro = generate_rollout(bb16, prompts, n_samples=3, max_new_tokens=7, temperature=0.7, seed=5)
    sampled = ro.sample_logp.clone()
    score_rollout(bb16, ro, temperature=0.7, reward_fn=lambda p, c: [0.0] * len(c), with_values=False)
    mask = ro.response_mask.bool()
    assert ro.logp.dtype == torch.float32 and mask.sum() > 10
    d = (ro.logp - sampled)[mask].abs()
    assert d.max() < 2e-2 and d.mean() < 2e-3, (d.max(), d.mean())


@pytest.mark.parametrize("grad_ckpt", (False, True), ids=("plain", "checkpointed"))
@pytest.mark.parametrize("micro", (None, 1), ids=("one-pass", "micro-batch-1"))
def test_bf16_first_minibatch_has_ratio_exactly_one(tmp_path, data, grad_ckpt, micro):
    """Scoring (eval, no grad, batches of whole prompt groups) and the update's forward (train,
    grad, a minibatch from a permutation, micro-batches that cut the groups, checkpointed or not)
    give bitwise the same bf16 log-probs, so the first minibatch's ratio is exactly 1."""
    seen = []
    cfg = load_config(None, {"run_dir": str(tmp_path / "run"), "device": "cpu", "progress": False,
                             "save_every": 100,
                             "model": {"dtype": "bfloat16", "gradient_checkpointing": grad_ckpt},
                             "ppo": {"prompts": str(data["prompts"]), "max_steps": 1, "batch_size": 3,
                                     "n_samples": 2, "max_new_tokens": 5, "ppo_epochs": 2, "minibatch_size": 3,
                                     "micro_batch_size": micro, "advantage": "grpo"}})
    train_ppo(cfg, reward_fn=lambda prompts, completions: [float(c.count("a")) + 0.1 * len(c) for c in completions],
              on_minibatch=lambda epoch, i, stats: seen.append((epoch, i, stats)))
    assert len(seen) == 4  # 2 epochs x 2 minibatches of 3 rows from 6
    first = seen[0][2]
    assert first["approx_kl"] == 0.0 and first["clipfrac"] == 0.0, first


def test_a_gguf_model_is_dequantized_to_bf16_on_a_bf16_cpu(tmp_path, detect):
    pytest.importorskip("gguf")
    from test_engine_gguf import write_tiny_gguf

    from rlfuse.engine import tiny

    detect({"avx512_bf16"})
    tok = tiny.build_tokenizer()
    write_tiny_gguf(tmp_path / "tiny.gguf", tok, tiny.build_model(tok))
    cache = tmp_path / "cache"
    bb = load_backbone(ModelConfig(name_or_path=str(tmp_path / "tiny.gguf"), gguf_cache=str(cache)), device="cpu")
    assert bb.dtype == torch.bfloat16 and bb.lm_head.weight.dtype == torch.bfloat16
    (key,) = (cache / "models").iterdir()
    assert "bfloat16" in {p.name for p in key.iterdir()} and "float32" not in {p.name for p in key.iterdir()}
