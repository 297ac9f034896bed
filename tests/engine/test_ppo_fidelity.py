"""PPO fidelity (issue 10): dropout off, KL-in-loss rules, critic start / lr / warm-up / own
adapter, reward scale, truncation, GRPO defaults."""

import functools
import json

import pytest
import torch
from engine_helpers import read_rows

import rlfuse.kernels as K
from rlfuse.engine import ppo as ppo_mod
from rlfuse.engine.checkpoint import latest_checkpoint, load_heads, load_safetensors, load_trainer_state
from rlfuse.engine.config import PPOConfig, RunConfig, load_config
from rlfuse.engine.ppo import build_ppo_backbone, resolve_loss_options, resolve_ppo_config, train_ppo
from rlfuse.engine.reward_scale import CALIBRATION_FILE, RewardScaler, RunningMoments, load_or_calibrate


def count_a(prompts, completions):
    return [float(c.count("a")) for c in completions]


def by_length(prompts, completions):  # never all zero: the zero-initialised critic has something to learn
    return [1.0 + len(c) for c in completions]


def _cfg(run_dir, data, ppo=None, **extra):
    ppo_keys = {"prompts": str(data["prompts"]), "max_steps": 1, "batch_size": 2, "n_samples": 2,
                "max_new_tokens": 4, "ppo_epochs": 1, "minibatch_size": 4, **(ppo or {})}
    return load_config(None, {"run_dir": str(run_dir), "device": "cpu", "progress": False, "save_every": 100,
                              "ppo": ppo_keys, **extra})


# ----------------------------------------------------------------------------- 1. dropout

@pytest.fixture
def dropout_model(tmp_path):
    """A tiny GPT-2 with attention, residual and embedding dropout 0.1, saved as a local model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlfuse.engine import tiny

    tok = tiny.build_tokenizer()
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                        attn_pdrop=0.1, resid_pdrop=0.1, embd_pdrop=0.1,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    directory = tmp_path / "gpt2-dropout"
    GPT2LMHeadModel(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def test_dropout_is_off_so_the_first_minibatch_has_ratio_one(tmp_path, data, dropout_model):
    seen = []
    cfg = _cfg(tmp_path / "run", data, ppo={"advantage": "gae", "minibatch_size": 2, "ppo_epochs": 2},
               model={"name_or_path": str(dropout_model)})
    train_ppo(cfg, reward_fn=count_a, on_minibatch=lambda epoch, i, stats: seen.append((epoch, i, stats)))
    assert len(seen) == 4  # 2 epochs x 2 minibatches
    first = seen[0][2]
    # before the update nothing moved: scoring (eval) and the update forward see one network
    assert first["approx_kl"] < 1e-7 and first["clipfrac"] == 0.0


def test_disable_dropout_zeroes_modules_and_config(dropout_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dropout_model)
    assert any(m.p > 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    ppo_mod.disable_dropout(model)
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert model.config.attn_pdrop == model.config.resid_pdrop == model.config.embd_pdrop == 0.0
    # Llama-style attention reads a float attribute, not a Dropout module
    from rlfuse.engine import tiny

    llama = tiny.build_model(tiny.build_tokenizer(), attention_dropout=0.1)
    assert llama.model.layers[0].self_attn.attention_dropout == 0.1
    ppo_mod.disable_dropout(llama)
    assert llama.model.layers[0].self_attn.attention_dropout == 0.0 and llama.config.attention_dropout == 0.0


# ----------------------------------------------------------------------------- 2 + 7. KL in the loss, GRPO defaults

def test_kl_in_loss_with_k1_is_rejected(tmp_path, data):
    with pytest.raises(ValueError, match=r"ppo.kl_estimator=k1 .*expected gradient is zero"):
        resolve_loss_options(PPOConfig(kl_in_loss=True, kl_estimator="k1"))
    cfg = _cfg(tmp_path / "run", data, ppo={"kl_in_loss": True, "kl_estimator": "k1"})
    with pytest.raises(ValueError, match="k1"):
        train_ppo(cfg, reward_fn=count_a)
    assert not (tmp_path / "run").exists()  # rejected before anything loads or is written
    with pytest.raises(ValueError, match="ppo.kl_estimator: unknown value 'k4'"):
        resolve_loss_options(PPOConfig(kl_estimator="k4"))


def test_grpo_defaults_put_the_kl_in_the_loss():
    grpo = resolve_loss_options(PPOConfig(advantage="grpo", n_samples=2))
    assert grpo.kl_in_loss is True and grpo.kl_estimator in ("k3+", "k2")  # gradient of KL(pi||ref)
    gae = resolve_loss_options(PPOConfig(advantage="gae"))
    assert gae.kl_in_loss is False and gae.kl_estimator == "k1" and gae.loss_agg == "token-mean"
    assert resolve_loss_options(PPOConfig(advantage="rloo", n_samples=2)).loss_agg == "token-mean"
    # explicit choices are kept
    kept = resolve_loss_options(PPOConfig(advantage="grpo", kl_in_loss=False, kl_estimator="k3"))
    assert kept.kl_in_loss is False and kept.kl_estimator == "k3"


needs_loss_agg = pytest.mark.skipif("loss_agg" not in __import__("inspect").signature(K.ppo_loss).parameters,
                                    reason="K.ppo_loss has no loss_agg kwarg in this build")


@needs_loss_agg
def test_grpo_aggregates_per_sequence():
    assert resolve_loss_options(PPOConfig(advantage="grpo", n_samples=2)).loss_agg == "seq-mean-token-mean"


@needs_loss_agg
@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_loss_agg_reaches_the_kernel(tmp_path, data, monkeypatch, agg):
    calls = []
    real = K.ppo_loss

    @functools.wraps(real)
    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ppo_mod.K, "ppo_loss", spy)
    cfg = _cfg(tmp_path / "run", data, ppo={"advantage": "grpo", "loss_agg": agg, "max_new_tokens": 5})
    train_ppo(cfg, reward_fn=count_a)
    assert calls and all(kw["loss_agg"] == agg for kw in calls)
    assert all(kw["kl_coef"] > 0 and kw["kl_estimator"] in ("k3+", "k2") for kw in calls)  # grpo: KL in the loss
    if agg == "seq-mean-token-sum-norm":  # Dr. GRPO: one constant normaliser, the generation budget
        assert all(kw["loss_agg_norm"] == 5.0 for kw in calls)


# ----------------------------------------------------------------------------- 3. critic

def test_value_head_starts_at_zero(tmp_path):
    bb, _ = build_ppo_backbone(RunConfig(run_dir=str(tmp_path)), "cpu", use_reward_model=False)
    assert all((p == 0).all() for p in bb.value_head.parameters())


def test_value_lr_and_critic_warmup_freeze_the_policy(tmp_path, data):
    cfg = _cfg(tmp_path / "run", data, ppo={"advantage": "gae", "value_lr": 3e-3, "critic_warmup_steps": 1})
    train_ppo(cfg, reward_fn=by_length)
    ckpt = latest_checkpoint(tmp_path / "run" / "ppo")
    groups = load_trainer_state(ckpt)["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == [cfg.ppo.lr, 3e-3]
    # no SFT: the policy starts as the zero LoRA update (B = 0) and, frozen, stays there
    policy = load_safetensors(ckpt / "adapter_model.safetensors")
    assert all((v == 0).all() for k, v in policy.items() if "lora_B" in k)
    heads = load_heads(ckpt)
    assert heads["value_head.proj.bias"].abs().item() > 0  # while the critic learned
    # without warm-up the same run moves the policy
    train_ppo(_cfg(tmp_path / "run2", data, ppo={"advantage": "gae"}), reward_fn=by_length)
    moved = load_safetensors(latest_checkpoint(tmp_path / "run2" / "ppo") / "adapter_model.safetensors")
    assert any((v != 0).any() for k, v in moved.items() if "lora_B" in k)


def test_adapter_critic_trains_its_own_adapter_and_resumes(tmp_path, data):
    def run(run_dir, max_steps, resume=False):
        cfg = _cfg(run_dir, data, ppo={"advantage": "gae", "critic": "adapter", "max_steps": max_steps},
                   save_every=1)
        cfg.resume = resume
        return train_ppo(cfg, reward_fn=by_length)

    run(tmp_path / "full", 2)
    run(tmp_path / "split", 1)
    run(tmp_path / "split", 2, resume=True)
    full, split = (load_heads(latest_checkpoint(tmp_path / d / "ppo")) for d in ("full", "split"))
    value_keys = [k for k in full if k.startswith("value_adapter.")]
    assert value_keys and any("lora_B" in k and (full[k] != 0).any() for k in value_keys)  # it trained
    policy = load_safetensors(latest_checkpoint(tmp_path / "full" / "ppo") / "adapter_model.safetensors")
    assert any(not torch.equal(full[k], policy[k.split(".", 1)[1]]) for k in value_keys)  # not the policy's
    assert full.keys() == split.keys()
    for k in full:  # the resumed run restored the value adapter and continued it
        torch.testing.assert_close(full[k], split[k], rtol=0, atol=1e-6)


def test_critic_options_are_checked():
    with pytest.raises(ValueError, match="ppo.critic: unknown value 'both'"):
        resolve_ppo_config(PPOConfig(critic="both"), use_reward_model=False)
    with pytest.raises(ValueError, match="ppo.value_init=reward needs a reward model"):
        resolve_ppo_config(PPOConfig(value_init="reward"), use_reward_model=False)
    with pytest.raises(ValueError, match="ppo.critic_warmup_steps"):
        resolve_ppo_config(PPOConfig(advantage="grpo", n_samples=2, critic_warmup_steps=2), use_reward_model=False)
    assert resolve_ppo_config(PPOConfig(critic="adapter"), use_reward_model=True).value_init == "reward"
    assert resolve_ppo_config(PPOConfig(), use_reward_model=True).value_init == "zero"


# ----------------------------------------------------------------------------- 4. reward scale

def test_running_moments_match_the_whole_history():
    torch.manual_seed(0)
    chunks = [torch.randn(n) * 3 + 1 for n in (1, 5, 8)]
    m = RunningMoments()
    for c in chunks:
        m.update(c)
    allx = torch.cat(chunks).double()
    assert m.count == 14 and m.mean == pytest.approx(allx.mean().item())
    assert m.std == pytest.approx(allx.std(unbiased=False).item())


def test_reward_scaler_normalises_then_penalises_then_clips():
    s = torch.tensor([3.0, 5.0, 7.0, 100.0])
    truncated = torch.tensor([False, True, False, False])
    out = RewardScaler("calibrated", mean=5.0, std=2.0, clip=4.0, missing_eos_penalty=1.0)(s, truncated)
    torch.testing.assert_close(out, torch.tensor([-1.0, -1.0, 1.0, 4.0]))
    torch.testing.assert_close(RewardScaler("none")(s), s)
    running = RewardScaler("running")
    out = running(s)
    torch.testing.assert_close(out, (s - s.mean()) / s.std(unbiased=False))


def test_calibration_is_written_once_and_reused(tmp_path):
    calls = []

    def sample():
        calls.append(1)
        return torch.tensor([1.0, 2.0, 3.0, 4.0])

    stats = load_or_calibrate(tmp_path, sample, info={"sft_checkpoint": None})
    assert stats["mean"] == pytest.approx(2.5)
    assert stats["std"] == pytest.approx(torch.tensor([1.0, 2, 3, 4]).std().item())
    assert json.loads((tmp_path / CALIBRATION_FILE).read_text())["n"] == 4
    assert load_or_calibrate(tmp_path, sample)["mean"] == pytest.approx(2.5) and len(calls) == 1


def test_reward_model_runs_are_calibrated_by_default(tmp_path, data):
    from rlfuse.engine.reward import train_reward

    run = tmp_path / "run"
    train_reward(load_config(None, {"run_dir": str(run), "device": "cpu", "progress": False,
                                    "rm": {"data": str(data["prefs"]), "max_steps": 1, "batch_size": 4}}))
    rm_ckpt = latest_checkpoint(run / "rm")
    assert not (rm_ckpt / CALIBRATION_FILE).exists()
    train_ppo(_cfg(run, data))
    stats = json.loads((rm_ckpt / CALIBRATION_FILE).read_text())
    assert stats["n"] >= 2 and stats["std"] > 0
    row = read_rows(run / "metrics.jsonl")[-1]
    assert row["reward_scaled"] == pytest.approx((row["reward"] - stats["mean"]) / stats["std"], abs=1e-5)

    # an adapter critic with a reward model starts as the reward model (adapter + head)
    bb, _ = build_ppo_backbone(_cfg(run, data, ppo={"critic": "adapter"}), "cpu", use_reward_model=True)
    for a, b in zip(bb.value_head.parameters(), bb.reward_head.parameters()):
        torch.testing.assert_close(a, b)
    value, reward = bb.adapter_state_dict("value"), bb.adapter_state_dict("reward")
    assert value.keys() == reward.keys() and all(torch.equal(value[k], reward[k]) for k in value)


def test_running_norm_state_is_checkpointed(tmp_path, data):
    def run(run_dir, max_steps, resume=False):
        cfg = _cfg(run_dir, data, ppo={"reward_norm": "running", "max_steps": max_steps}, save_every=1)
        cfg.resume = resume
        train_ppo(cfg, reward_fn=by_length)
        return load_trainer_state(latest_checkpoint(run_dir / "ppo"))["extra"]["reward_moments"]

    full = run(tmp_path / "full", 2)
    assert full["count"] == 2 * 2 * 2  # 2 steps x 2 prompts x 2 samples
    run(tmp_path / "split", 1)
    resumed = run(tmp_path / "split", 2, resume=True)  # continues the moments, not from zero
    assert resumed == pytest.approx(full)


def test_reward_norm_choices_and_defaults():
    assert resolve_ppo_config(PPOConfig(), use_reward_model=True).reward_norm == "calibrated"
    assert resolve_ppo_config(PPOConfig(), use_reward_model=False).reward_norm == "none"
    with pytest.raises(ValueError, match="ppo.reward_norm=calibrated needs a reward model"):
        resolve_ppo_config(PPOConfig(reward_norm="calibrated"), use_reward_model=False)
    with pytest.raises(ValueError, match="ppo.reward_norm: unknown value 'zscore'"):
        resolve_ppo_config(PPOConfig(reward_norm="zscore"), use_reward_model=False)


# ----------------------------------------------------------------------------- 5. truncation

def test_reward_fn_sees_truncation_and_missing_eos_is_penalised(tmp_path, data):
    seen = []

    def zero_with_truncation(prompts, completions, truncated):
        seen.append(list(truncated))
        return [0.0] * len(completions)

    cfg = _cfg(tmp_path / "run", data, ppo={"max_new_tokens": 2, "missing_eos_penalty": 0.5, "max_steps": 2})
    train_ppo(cfg, reward_fn=zero_with_truncation)
    assert len(seen) == 2 and all(len(t) == 4 and all(isinstance(x, bool) for x in t) for t in seen)
    rows = read_rows(tmp_path / "run" / "metrics.jsonl")
    for row, t in zip(rows, seen):
        assert row["truncated_frac"] == pytest.approx(sum(t) / len(t))
        assert row["reward"] == 0.0 and row["reward_scaled"] == pytest.approx(-0.5 * sum(t) / len(t))
    assert any(any(t) for t in seen)  # 2 new tokens of a random model: most answers are cut


def test_two_argument_reward_functions_still_work():
    from rlfuse.engine.rollout import accepts_truncated

    assert not accepts_truncated(count_a)
    assert accepts_truncated(lambda p, c, truncated=None: None)
    assert accepts_truncated(lambda p, c, **kw: None)
