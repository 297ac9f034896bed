"""Options every stage's gradient step takes (AdamW eps, a learning-rate schedule with warm-up)
and GRPO's reward scaling (group | batch | none), against hand-computed or transformers' values."""

from __future__ import annotations

import math

import pytest
import torch
from engine_helpers import FAST

from rlfuse.engine.advantages import grpo_advantages
from rlfuse.engine.config import RunConfig, apply_overrides, validate
from rlfuse.engine.optim import apply_lr_schedule, lr_factor, make_optimizer


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_lr_factor_matches_transformers_schedules(schedule, warmup):
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    total = 11
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    make = get_linear_schedule_with_warmup if schedule == "linear" else get_cosine_schedule_with_warmup
    sched = make(opt, num_warmup_steps=warmup, num_training_steps=total)
    for step in range(total):
        assert lr_factor(schedule, step, total, warmup) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
        opt.step()
        sched.step()


def test_constant_schedule_and_warmup_by_hand():
    assert [lr_factor("constant", s, 10, 4) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor("cosine", 5, 10, 0) == pytest.approx(0.5)
    assert lr_factor("linear", 10, 10, 0) == 0.0


def test_schedule_scales_each_groups_own_base_lr():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = make_optimizer([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=1e-3, eps=1e-5)
    assert all(g["eps"] == 1e-5 for g in opt.param_groups)
    apply_lr_schedule(opt, 1.0)
    apply_lr_schedule(opt, 0.25)
    apply_lr_schedule(opt, 0.5)  # from the base, not compounding
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(5e-4), pytest.approx(0.25)]


def test_sft_steps_run_on_the_schedule(cli, data, tmp_path, monkeypatch):
    seen = []
    step = torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        seen.append((self.param_groups[0]["lr"], self.param_groups[0]["eps"]))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    code, _, err = cli("sft", "--data", data["sft"], "--run-dir", tmp_path / "run", "--max-steps", 5, *FAST,
                       "--set", "sft.lr=0.01", "--set", "sft.lr_schedule=linear", "--set", "sft.warmup_steps=2",
                       "--set", "sft.adam_eps=1e-6")
    assert code == 0, err
    want = [0.01 * lr_factor("linear", s, 5, 2) for s in range(5)]
    assert [lr for lr, _ in seen] == pytest.approx(want) and want[0] == 0.0 and want[2] == 0.01
    assert all(eps == 1e-6 for _, eps in seen)


@pytest.mark.parametrize("key,value,match", [
    ("sft.lr_schedule", "exp", "must be one of constant, linear, cosine"),
    ("rm.warmup_steps", -1, "must be an integer >= 0"),
    ("ppo.adam_eps", 0.0, "must be a finite number > 0"),
    ("ppo.scale_rewards", "std", "must be one of group, batch, none"),
])
def test_bad_step_options_name_the_key(key, value, match):
    with pytest.raises(ValueError, match=rf"config key '{key}': {match}"):
        validate(apply_overrides(RunConfig(), {key: value}))


def test_scale_rewards_needs_an_estimator_that_scales():
    from rlfuse.engine.config import PPOConfig
    from rlfuse.engine.ppo import resolve_ppo_config

    for advantage in ("gae", "rloo"):
        with pytest.raises(ValueError, match=f"ppo.scale_rewards=none: ppo.advantage={advantage} does not scale"):
            resolve_ppo_config(PPOConfig(scale_rewards="none", advantage=advantage, n_samples=2), use_reward_model=False)
    resolve_ppo_config(PPOConfig(scale_rewards="none", advantage="grpo", n_samples=2), use_reward_model=False)


def test_grpo_reward_scaling_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0])  # two groups of two
    centered = torch.tensor([-0.5, 0.5, -1.5, 1.5])
    group_std = torch.tensor([math.sqrt(0.5)] * 2 + [math.sqrt(4.5)] * 2)
    batch_std = torch.tensor([1.0, 2.0, 3.0, 6.0]).std()  # Bessel, over the batch
    torch.testing.assert_close(grpo_advantages(scores, 2), centered / (group_std + 1e-6))
    torch.testing.assert_close(grpo_advantages(scores, 2, scale="batch"), centered / (batch_std + 1e-6))
    torch.testing.assert_close(grpo_advantages(scores, 2, scale="none"), centered)


def test_loss_options_follow_the_kernels_rules():
    from rlfuse.engine.ppo import resolve_loss_options
    from rlfuse.engine.config import PPOConfig

    # clip_eps_high = 0 (no upward move) is the kernel's to allow, and value_clip=None (no clipping)
    validate(apply_overrides(RunConfig(), {"ppo.clip_eps_high": 0.0, "ppo.value_clip": None}))
    resolve_loss_options(PPOConfig(clip_eps_high=0.0, value_clip=None))
    with pytest.raises(ValueError, match=r"^ppo\.dual_clip must be > 1"):
        resolve_loss_options(PPOConfig(dual_clip=1.0))
    assert resolve_loss_options(PPOConfig(advantage="grpo", n_samples=2)).kl_estimator == "k3+"


def test_estimators_declare_their_traits_and_a_new_one_needs_no_other_file(tmp_path):
    from rlfuse.engine import advantages as A
    from rlfuse.engine.config import PPOConfig
    from rlfuse.engine.ppo import resolve_ppo_config

    assert {n: (e.needs_critic, e.grouped, e.kl_in_loss, e.loss_agg) for n, e in A.REGISTRY.items()} == {
        "gae": (True, False, False, "token-mean"), "grpo": (False, True, True, "seq-mean-token-mean"),
        "rloo": (False, True, False, "token-mean")}
    with pytest.raises(ValueError, match=r"^ppo.advantage: unknown estimator 'ppg' \(use one of gae, grpo, rloo\)$"):
        resolve_ppo_config(PPOConfig(advantage="ppg"), use_reward_model=False)

    @A.register_estimator("mean-baseline", needs_critic=False, grouped=True, kl_in_loss=True, loss_agg="token-mean")
    def _mean_baseline(ro, *, n_samples, **_):
        g = ro.scores.view(-1, n_samples)
        return (g - g.mean(1, keepdim=True)).reshape(-1)[:, None] * ro.response_mask, None

    try:
        c = resolve_ppo_config(PPOConfig(advantage="mean-baseline", n_samples=2), use_reward_model=False)
        assert c.kl_in_loss and c.loss_agg == "token-mean" and c.kl_estimator == "k3+"
        with pytest.raises(ValueError, match="compares samples of a prompt"):
            resolve_ppo_config(PPOConfig(advantage="mean-baseline", n_samples=1), use_reward_model=False)

        class Ro:
            scores = torch.tensor([1.0, 3.0, 2.0, 2.0])
            response_mask = torch.ones(4, 2)

        adv, ret = A.compute_advantages(Ro, estimator="mean-baseline", n_samples=2, kl_coef=0.1, kl_in_loss=True)
        assert ret is None and adv[:, 0].tolist() == [-1.0, 1.0, 0.0, 0.0]
    finally:
        del A.REGISTRY["mean-baseline"]


def test_reward_calibration_is_redone_when_its_settings_change(tmp_path, capsys):
    from rlfuse.engine.reward_scale import load_or_calibrate

    calls = []

    def sample():
        calls.append(1)
        return torch.tensor([1.0, 2.0, 3.0]) * len(calls)

    first = {"sft_checkpoint": "runs/a/sft/ckpt-1", "temperature": 1.0, "n_samples": 4, "max_new_tokens": 20}
    assert load_or_calibrate(tmp_path, sample, info=first)["mean"] == pytest.approx(2.0)
    assert load_or_calibrate(tmp_path, sample, info=first)["mean"] == pytest.approx(2.0) and len(calls) == 1
    capsys.readouterr()
    hotter = {**first, "temperature": 0.7}
    stats = load_or_calibrate(tmp_path, sample, info=hotter)
    assert len(calls) == 2 and stats["mean"] == pytest.approx(4.0) and stats["temperature"] == 0.7
    out = capsys.readouterr().out
    assert "temperature 1.0 -> 0.7" in out and "recalibrating" in out and len(out.strip().splitlines()) == 1
    assert load_or_calibrate(tmp_path, sample, info=hotter)["mean"] == pytest.approx(4.0) and len(calls) == 2


def test_a_kernel_loss_option_reaches_the_op_from_the_config(cli, data, tmp_path, monkeypatch):
    """ppo.kl_clamp: checked by the kernel's own rule, then passed to every K.ppo_loss call."""
    import rlfuse.kernels as K
    from rlfuse.engine.config import PPOConfig
    from rlfuse.engine.ppo import resolve_loss_options

    with pytest.raises(ValueError, match=r"^ppo\.kl_clamp must be > 0"):
        resolve_loss_options(PPOConfig(kl_clamp=-1.0))
    seen = []
    op = K.ppo_loss

    def spy(*args, **kwargs):
        seen.append(kwargs["kl_clamp"])
        return op(*args, **kwargs)

    monkeypatch.setattr(K, "ppo_loss", spy)
    code, _, err = cli("ppo", "--prompts", data["prompts"], "--reward-fn", data["reward_fn"], "--run-dir",
                       tmp_path / "run", "--max-steps", 1, "--advantage", "grpo", *FAST, "--set", "ppo.kl_clamp=10")
    assert code == 0, err
    assert seen and set(seen) == {10.0}


def test_every_kernel_loss_option_is_a_ppo_key_with_the_kernels_default():
    """PPOConfig reads the kernel's option table: a new PPOLossOptions field without a ppo.<key>
    (or with another default) fails here, and the step passes the kernel's own object on."""
    import dataclasses

    from rlfuse.engine.config import PPOConfig
    from rlfuse.engine.loss_options import AUTO_OPTIONS, CONFIG_OPTIONS, STEP_OPTIONS, loss_options
    from rlfuse.kernels.ppo_options import PPOLossOptions

    kernel = {f.name: f.default for f in dataclasses.fields(PPOLossOptions)}
    config = {f.name: f.default for f in dataclasses.fields(PPOConfig)}
    assert set(CONFIG_OPTIONS) | set(STEP_OPTIONS) == set(kernel)
    missing = [n for n in CONFIG_OPTIONS if n not in config]
    assert not missing, f"kernel loss options without a ppo.<key> in PPOConfig: {missing}"
    for name in CONFIG_OPTIONS:
        assert config[name] == ("auto" if name in AUTO_OPTIONS else kernel[name]), name
    opts = loss_options(PPOConfig(clip_eps=0.3, loss_agg="seq-mean-token-sum-norm", max_new_tokens=17), kl_coef=0.2)
    assert isinstance(opts, PPOLossOptions) and (opts.clip_eps, opts.kl_coef, opts.loss_agg_norm) == (0.3, 0.2, 17.0)


@pytest.mark.parametrize("key, value, message", [
    ("ppo.value_clip", -0.1, "value_clip must be >= 0"), ("ppo.dual_clip", 0.5, "dual_clip must be > 1"),
    ("ppo.clip_eps_high", -1.0, "clip_eps_high must be >= 0"), ("ppo.value_coef", -0.5, "value_coef must be >= 0"),
    ("ppo.kl_estimator", "k9", "unknown kl_estimator 'k9'")])
def test_the_config_checks_loss_options_by_the_kernels_rule(key, value, message):
    with pytest.raises(ValueError, match=rf"^config key '{key}': {message}"):
        validate(apply_overrides(RunConfig(), {key: value}))
