"""Proof on the real trainer: TRL's GRPOTrainer, plain vs rlfuse-patched, same seed.

Each run is a fresh subprocess (this file run as a script) so that its peak RSS is its own:
a tiny random Llama, a character-level tokenizer built offline, a rule-based reward, a few
CPU steps. The parent compares the logged losses/metrics, the first batch's per-token
log-probs, the final weights and the peak memory, and checks with spies that the plain run
never touched rlfuse and the patched run never touched TRL's chunked log-prob kernel.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # two fresh trainer processes: ~60 s on a busy 2-core box

STEPS = 3
SEED = 1234


# ----------------------------------------------------------------------------------------
# The run itself (subprocess side)
# ----------------------------------------------------------------------------------------

def build_tokenizer():
    """A character-level PreTrainedTokenizerFast with a chat template, built without the hub."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789 .,:?!+-=")
    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<bos>", eos_token="<eos>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}a:{% endif %}")
    return tok


def reward_vowels(completions, **kwargs):
    """Rule-based reward: fraction of vowels in the completion."""
    return [sum(c in "aeiou" for c in text) / max(len(text), 1) for text in completions]


def _peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_grpo(mode: str, out_dir: str, steps: int = STEPS, vocab_pad: int = 0, hidden: int = 48,
             completion_len: int = 8, batch: int = 4) -> dict:
    """One GRPO run, ``mode`` in {"plain", "patched"}; writes its results under ``out_dir``."""
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import GRPOConfig, GRPOTrainer
    from trl.kernels import chunked_logprob

    import rlfuse.integrations.trl as rt
    import rlfuse.kernels as K

    torch.manual_seed(SEED)
    torch.set_num_threads(1)  # bitwise-stable matmuls across the two processes
    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok) + vocab_pad, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False)
    model_dir = os.path.join(out_dir, "model")  # a path: TRL builds the reference model from it
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    prompts = [f"add {i} and {i + 3}:" for i in range(16)]
    dataset = Dataset.from_dict({"prompt": prompts})

    # spies: count calls into rlfuse's fused head and into TRL's chunked log-prob kernel
    calls = {"rlfuse_linear_logprobs": 0, "trl_chunked_logprob": 0}
    real_linear = K.linear_logprobs

    @functools.wraps(real_linear)
    def spy_linear(*a, **k):
        calls["rlfuse_linear_logprobs"] += 1
        return real_linear(*a, **k)

    K.linear_logprobs = spy_linear
    real_forward = chunked_logprob.ChunkedLogProbFunction.forward

    @functools.wraps(real_forward)  # keeps the signature rlfuse's version check reads
    def spy_forward(ctx, *a, **k):
        calls["trl_chunked_logprob"] += 1
        return real_forward(ctx, *a, **k)

    chunked_logprob.ChunkedLogProbFunction.forward = staticmethod(spy_forward)

    args = GRPOConfig(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=batch, num_generations=batch,
        max_completion_length=completion_len, learning_rate=5e-3, beta=0.04, temperature=0.7,
        logging_steps=1, report_to="none", use_cpu=True, bf16=False, fp16=False, save_strategy="no",
        seed=SEED, data_seed=SEED, dataloader_num_workers=0, disable_dropout=True, log_completions=False,
    )
    if mode == "patched":
        rt.patch()
    trainer = GRPOTrainer(model=model_dir, reward_funcs=reward_vowels, args=args, train_dataset=dataset,
                          processing_class=tok)
    first_logps = {}
    real_get = trainer._get_per_token_logps_and_entropies

    def record(*a, **k):
        logps, entropies, *rest = real_get(*a, **k)
        if "logps" not in first_logps and torch.is_grad_enabled():  # the first training forward
            first_logps["logps"] = logps.detach().clone()
            if entropies is not None:
                first_logps["entropy"] = entropies.detach().clone()
        return (logps, entropies, *rest)

    trainer._get_per_token_logps_and_entropies = record
    rss_before = _current_rss_mb()
    trainer.train()
    peak = _peak_rss_mb()
    torch.save({"state": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
                **first_logps}, os.path.join(out_dir, "tensors.pt"))
    history = [{k: v for k, v in row.items() if isinstance(v, (int, float))}
               for row in trainer.state.log_history if "loss" in row]
    result = {"mode": mode, "history": history, "calls": calls, "peak_rss_mb": peak,
              "rss_before_train_mb": rss_before, "train_peak_delta_mb": peak - rss_before,
              "patch_stats": rt.patch_stats()}
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(result, f)
    return result


# ----------------------------------------------------------------------------------------
# The test (parent side)
# ----------------------------------------------------------------------------------------

def _run_both(root) -> dict:
    """One fresh process per mode, one after the other, so each peak RSS is that run's own."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true",
               PYTHONHASHSEED="0")
    results = {}
    for mode in ("plain", "patched"):
        out_dir = str(root / mode)
        os.makedirs(out_dir, exist_ok=True)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), mode, out_dir], env=env,
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise AssertionError(f"{mode} GRPO run failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n"
                                 f"{proc.stderr[-8000:]}")
        with open(os.path.join(out_dir, "result.json")) as f:
            results[mode] = (json.load(f), out_dir)
    return results


@pytest.fixture(scope="module")
def grpo_runs(tmp_path_factory):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    return _run_both(tmp_path_factory.mktemp("grpo"))


def test_grpo_spies_show_which_kernel_ran(grpo_runs):
    plain, patched = grpo_runs["plain"][0], grpo_runs["patched"][0]
    assert plain["calls"]["trl_chunked_logprob"] > 0
    assert plain["calls"]["rlfuse_linear_logprobs"] == 0
    assert patched["calls"]["rlfuse_linear_logprobs"] > 0
    assert patched["calls"]["trl_chunked_logprob"] == 0
    assert patched["patch_stats"]["fallback"] == 0


def test_grpo_losses_and_metrics_agree(grpo_runs):
    plain, patched = grpo_runs["plain"][0]["history"], grpo_runs["patched"][0]["history"]
    assert len(plain) == len(patched) == STEPS
    for step, (a, b) in enumerate(zip(plain, patched)):
        for key in ("loss", "entropy", "kl", "reward", "grad_norm", "completions/mean_length"):
            assert key in a and key in b, (key, sorted(a))
            assert b[key] == pytest.approx(a[key], rel=2e-3, abs=2e-4), (step, key, a[key], b[key])


def test_grpo_logprobs_and_weights_agree(grpo_runs):
    import torch

    plain = torch.load(os.path.join(grpo_runs["plain"][1], "tensors.pt"))
    patched = torch.load(os.path.join(grpo_runs["patched"][1], "tensors.pt"))
    assert plain["logps"].shape == patched["logps"].shape and plain["logps"].numel() > 0
    torch.testing.assert_close(patched["logps"], plain["logps"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(patched["entropy"], plain["entropy"], rtol=1e-4, atol=1e-5)
    assert plain["logps"].abs().sum() > 0  # something was actually scored
    for name, w in plain["state"].items():
        torch.testing.assert_close(patched["state"][name], w, rtol=1e-3, atol=1e-4, msg=name)


def test_grpo_peak_memory_does_not_rise(grpo_runs):
    plain, patched = grpo_runs["plain"][0], grpo_runs["patched"][0]
    # whole-process peak, and the peak growth during train(): allow allocator/page noise
    assert patched["peak_rss_mb"] <= plain["peak_rss_mb"] * 1.05 + 32, (plain, patched)
    assert patched["train_peak_delta_mb"] <= plain["train_peak_delta_mb"] * 1.25 + 32, (plain, patched)


if __name__ == "__main__":
    run_grpo(sys.argv[1], sys.argv[2])
