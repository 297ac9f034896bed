"""`rlfuse export`: a tiny run's checkpoints loaded back by transformers / peft give the engine's numbers."""

from __future__ import annotations

import json

import pytest
import torch
from engine_helpers import FAST, WORDS, write_jsonl

from rlfuse.engine.cli import main

TEXTS = ["say red", "hello there, a longer prompt", "x"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny run with a trained sft adapter and reward model (high lr so LoRA is far from zero)."""
    root = tmp_path_factory.mktemp("export")
    sft = write_jsonl(root / "sft.jsonl", [{"prompt": f"say {w}", "response": f"{w} {w}"} for w in WORDS])
    # a rating too: Bradley-Terry alone never moves the head's bias, the regression term does
    prefs = write_jsonl(root / "prefs.jsonl", [{"prompt": f"say {w}", "chosen": w, "rejected": "no"} for w in WORDS]
                        + [{"prompt": "say sun", "response": "sun", "score": 3.0}])
    run_dir = root / "run"
    common = [*FAST, "--run-dir", run_dir, "--max-steps", "2"]
    assert main([str(a) for a in ["sft", "--data", sft, *common, "--set", "sft.lr=0.02"]]) == 0
    assert main([str(a) for a in ["rm", "--data", prefs, *common, "--set", "rm.lr=0.02",
                                  "--set", "rm.eval_fraction=0"]]) == 0
    return run_dir


def _engine(run_dir, role):
    from rlfuse.engine.trained import load_trained

    return load_trained(run_dir, role, device="cpu").backbone


def _batch(tok, texts, side="right"):
    from rlfuse.engine.data import pad

    return pad([tok(t, add_special_tokens=False)["input_ids"] for t in texts], tok.pad_token_id, side=side)


@torch.no_grad()
def _engine_logits(bb, ids, attn):
    with bb.use("policy"):
        hidden = bb.hidden_states(ids, attn)
    return bb.lm_head(hidden).float()


def _rel(a, b, mask):
    m = mask.bool()
    return float((a[m] - b[m]).abs().max() / b[m].abs().max())


def _export(tmp_path, *args):
    out = tmp_path / "out"
    code = main([str(a) for a in ["export", *args, "--out", out, "--device", "cpu"]])
    assert code == 0
    return out


def test_merged_export_matches_engine_logits(run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = _export(tmp_path, run, "--max-shard-size", "200KB")
    files = {p.name for p in out.iterdir()}
    assert "config.json" in files and "generation_config.json" in files
    assert any(f.endswith(".safetensors") for f in files)
    assert "model.safetensors.index.json" in files  # --max-shard-size split the weights
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())  # no temp folder left

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    bb = _engine(run, "policy")
    assert tok.chat_template == bb.tokenizer.chat_template
    ids, attn = _batch(tok, TEXTS)
    with torch.no_grad():
        hf = model(input_ids=ids, attention_mask=attn).logits.float()
    ref = _engine_logits(bb, ids, attn)
    rel = _rel(hf, ref, attn)
    print(f"merged export: max relative logit difference {rel:.2e}")
    assert rel <= 1e-4
    # the adapter really is in there: the bare base differs
    with torch.no_grad(), bb.use(None):
        bare = bb.lm_head(bb.hidden_states(ids, attn)).float()
    assert _rel(bare, ref, attn) > 1e-3

    gen = GenerationConfig.from_pretrained(out)
    assert gen.do_sample and gen.top_k == 0 and gen.top_p == 1.0 and gen.repetition_penalty == 1.0
    assert gen.eos_token_id == tok.eos_token_id


def test_merged_export_samples_plain_softmax_and_greedy_matches_sampler(run, tmp_path):
    from transformers import AutoModelForCausalLM

    out = _export(tmp_path, run)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    bb = _engine(run, "policy")
    ids, attn = _batch(bb.tokenizer, ["say red"])
    torch.manual_seed(0)
    res = model.generate(ids, attention_mask=attn, max_new_tokens=3, output_scores=True, output_logits=True,
                         return_dict_in_generate=True)
    for scores, logits in zip(res.scores, res.logits):  # no processor touched the logits (T = 1)
        torch.testing.assert_close(scores, logits)
    hf_greedy = model.generate(ids, attention_mask=attn, max_new_tokens=6, do_sample=False)
    ours = bb.generate(ids, attn, max_new_tokens=6, greedy=True)
    n = min(hf_greedy.shape[1], ours.shape[1])
    assert torch.equal(hf_greedy[:, :n], ours[:, :n])


def test_export_dtype_bfloat16(run, tmp_path):
    out = _export(tmp_path, run, "--dtype", "bfloat16")
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_adapter_only_export_loads_with_peft(run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlfuse.engine import tiny

    base_dir = tmp_path / "base"
    bb = _engine(run, "policy")
    tiny.build_model(bb.tokenizer).save_pretrained(base_dir)
    out = _export(tmp_path, run, "--adapter-only", "--base-model", base_dir)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir.resolve())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out).eval()
    ids, attn = _batch(bb.tokenizer, TEXTS)
    with torch.no_grad():
        hf = model(input_ids=ids, attention_mask=attn).logits.float()
    assert _rel(hf, _engine_logits(bb, ids, attn), attn) <= 1e-4


def test_reward_export_matches_engine_scores_with_padding(run, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlfuse.engine.data import reward_ids

    out = _export(tmp_path, run, "--role", "reward")
    note = capsys.readouterr().out
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    assert "score.weight" in dict(model.named_parameters())
    bb = _engine(run, "reward")
    seqs = [reward_ids(bb.tokenizer, [{"role": "user", "content": f"say {w}"}], r, 64)
            for w, r in [("red", "red"), ("sun", "no"), ("a much longer prompt here", "ok")]]
    from rlfuse.engine.data import pad

    ids, attn = pad(seqs, tok.pad_token_id)  # rows of different lengths: right padding
    with torch.no_grad():
        ours = bb.reward_scores(ids, attn)
        hf = model(input_ids=ids, attention_mask=attn).logits.squeeze(-1)
    bias = model.config.rlfuse_reward_bias
    assert bias != 0.0 and "rlfuse_reward_bias" in note
    print(f"reward export: bias {bias:.4g}, max |logits + bias - engine| {float((hf + bias - ours).abs().max()):.2e}")
    torch.testing.assert_close(hf + bias, ours, rtol=1e-4, atol=1e-5)
    assert torch.equal(torch.argsort(hf), torch.argsort(ours))  # the same ranking


def test_reward_pad_differs_from_eos_when_tokenizer_pads_with_eos():
    from rlfuse.engine import tiny
    from rlfuse.engine.export import _reward_pad_token_id

    tok = tiny.build_tokenizer()
    tok.pad_token = tok.eos_token
    pad_id = _reward_pad_token_id(tok)
    assert pad_id != tok.eos_token_id and tok.pad_token_id == pad_id


def test_export_errors_are_one_line(run, tmp_path, cli):
    out = tmp_path / "exists"
    out.mkdir()
    code, _, err = cli("export", run, "--out", out, "--device", "cpu")
    assert code == 2 and "already exists" in err and "--force" in err and "Traceback" not in err

    code, _, err = cli("export", tmp_path / "nowhere", "--out", tmp_path / "o", "--device", "cpu")
    assert code == 2 and "checkpoint not found" in err

    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(run / "sft" / (run / "sft" / "latest").read_text().strip(), partial)
    (partial / "trainer_state.pt").unlink()
    code, _, err = cli("export", partial, "--out", tmp_path / "o", "--device", "cpu")
    assert code == 2 and "incomplete checkpoint" in err and "trainer_state.pt" in err
    assert not (tmp_path / "o").exists()

    code, _, err = cli("export", run / "rm", "--out", tmp_path / "o", "--device", "cpu")
    assert code == 2 and "--role reward" in err


def test_force_replaces_an_existing_export(run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert main([str(a) for a in ["export", run, "--out", out, "--device", "cpu", "--force"]]) == 0
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_4bit_base_is_dequantized_before_the_merge(tmp_path):
    """A 4-bit base: the export is dequant(W) + BA in full precision (bitsandbytes' own CPU kernel
    rounds activations to bf16, hence the looser bound); also after a forward has repacked the weights."""
    pytest.importorskip("bitsandbytes")
    from rlfuse.engine.export import merged_causal_lm
    from rlfuse.engine.trained import load_trained

    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"say {w}", "response": w} for w in WORDS[:4]])
    run_dir = tmp_path / "run"
    assert main([str(a) for a in ["sft", "--data", sft, *FAST, "--run-dir", run_dir, "--max-steps", "1",
                                  "--set", "sft.lr=0.02", "--set", "model.quantization=4bit"]]) == 0
    bb = load_trained(run_dir, device="cpu").backbone
    assert bb.quantized
    ids, attn = _batch(bb.tokenizer, TEXTS)
    ref = _engine_logits(bb, ids, attn)  # this forward repacks bnb's CPU weights
    with torch.no_grad():
        merged = merged_causal_lm(bb, "policy").eval()
        assert not any(type(p).__name__ == "Params4bit" for p in merged.parameters())
        hf = merged(input_ids=ids, attention_mask=attn).logits.float()
    assert _rel(hf, ref, attn) <= 1e-2


def test_ppo_policy_export_carries_its_sampling_temperature(tmp_path):
    from transformers import AutoModelForCausalLM, GenerationConfig

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say {w}"} for w in WORDS[:4]])
    rf = tmp_path / "rewards.py"
    rf.write_text("def count_a(prompts, completions):\n    return [float(c.count('a')) for c in completions]\n")
    run_dir = tmp_path / "run"
    assert main([str(a) for a in ["ppo", "--prompts", prompts, "--reward-fn", f"{rf}:count_a", *FAST,
                                  "--run-dir", run_dir, "--max-steps", "1", "--set", "ppo.lr=0.05",
                                  "--set", "ppo.temperature=0.8"]]) == 0
    out = _export(tmp_path, run_dir)
    info_ckpt = str(next((run_dir / "ppo").glob("ckpt-*")))
    gen = GenerationConfig.from_pretrained(out)
    assert gen.temperature == pytest.approx(0.8) and gen.top_k == 0
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    bb = _engine(run_dir, "policy")
    ids, attn = _batch(bb.tokenizer, TEXTS)
    with torch.no_grad():
        hf = model(input_ids=ids, attention_mask=attn).logits.float()
    assert _rel(hf, _engine_logits(bb, ids, attn), attn) <= 1e-4
    from rlfuse.engine.trained import find_checkpoint

    assert str(find_checkpoint(run_dir)) == info_ckpt  # the run folder means its ppo checkpoint
