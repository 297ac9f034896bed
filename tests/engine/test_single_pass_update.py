"""One optimisation pass over one minibatch: scoring skips the policy pass, the update's own
forward gives the old log-probs, and the step is the same as with the extra pass."""

import dataclasses

import pytest
import torch
from engine_helpers import chat_prompts as _prompts, length_reward as _reward, random_policy_backbone

from rlfuse.engine.advantages import compute_advantages
from rlfuse.engine.backbone import load_backbone
from rlfuse.engine.config import ModelConfig, RunConfig
from rlfuse.engine.ppo import ppo_update, resolve_loss_options
from rlfuse.engine.rollout import generate_rollout, score_rollout
from rlfuse.engine.step_values import UpdateBatch


def test_single_pass_update_reuses_the_training_forward():
    bb = random_policy_backbone()
    ro = generate_rollout(bb, _prompts(bb.tokenizer), n_samples=4, max_new_tokens=6, seed=1)
    c = resolve_loss_options(dataclasses.replace(RunConfig().ppo, advantage="grpo", n_samples=4, ppo_epochs=1,
                                                 minibatch_size=len(ro), kl_coef=0.1))
    assert c.kl_in_loss

    calls = []  # scoring passes (a pass is 1 decoder call, or 2 when its prompts are shared: prefix_share.py)
    pass_fn = bb.completion_hidden_states
    bb.completion_hidden_states = lambda *a, **k: calls.append(1) or pass_fn(*a, **k)
    full = score_rollout(bb, dataclasses.replace(ro), reward_fn=_reward, with_values=False)
    n_full = len(calls)
    calls.clear()
    skip = score_rollout(bb, dataclasses.replace(ro), reward_fn=_reward, with_values=False, with_policy=False)
    del bb.completion_hidden_states
    assert skip.logp is None and len(calls) == n_full - 1  # one policy pass saved

    params = bb.adapter_parameters("policy")
    start = [p.detach().clone() for p in params]

    def update(rollout):
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
        adv, _ = compute_advantages(rollout, estimator="grpo", n_samples=4, kl_coef=0.1, kl_in_loss=True)
        torch.manual_seed(0)
        result = ppo_update(bb, torch.optim.SGD(params, lr=0.5), UpdateBatch.of(rollout, adv, None, loss_kl_coef=0.1), c)
        return result, [p.detach().clone() - s for p, s in zip(params, start)]

    result_full, delta_full = update(full)
    result_skip, delta_skip = update(skip)
    stats_skip = result_skip.stats
    assert sum(float(d.abs().sum()) for d in delta_full) > 1e-3  # the step really moved the policy
    for a, b in zip(delta_full, delta_skip):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    # the training forward's log-probs and entropies come back for the KL / entropy metrics
    assert result_full.old_logp is None  # scored old log-probs: nothing to give back
    torch.testing.assert_close(result_skip.old_logp, full.logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result_skip.entropy, full.entropy, atol=1e-5, rtol=1e-5)
    assert stats_skip["clipfrac"] == 0.0 and abs(stats_skip["approx_kl"]) < 1e-6  # ratio exactly 1


def test_reusing_the_training_forward_needs_a_single_pass():
    bb = load_backbone(ModelConfig(), device="cpu", adapters=["policy"])
    ro = generate_rollout(bb, _prompts(bb.tokenizer), n_samples=2, max_new_tokens=3, seed=1)
    skip = score_rollout(bb, ro, reward_fn=_reward, with_values=False, with_policy=False)
    c = resolve_loss_options(dataclasses.replace(RunConfig().ppo, advantage="grpo", n_samples=2, ppo_epochs=2,
                                                 minibatch_size=len(ro)))
    adv, _ = compute_advantages(skip, estimator="grpo", n_samples=2, kl_coef=0.1, kl_in_loss=True)
    with pytest.raises(ValueError, match="needs ppo_epochs=1, one minibatch"):
        ppo_update(bb, torch.optim.SGD(bb.adapter_parameters("policy"), lr=0.1),
                   UpdateBatch.of(skip, adv, None, loss_kl_coef=0.1), c)
