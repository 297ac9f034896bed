"""The PPO step's values flow forward: Sampled -> Scored -> UpdateBatch are frozen, each is made
by one function, and no stage writes into an earlier value (the update included)."""

import dataclasses

import pytest
import torch
from engine_helpers import chat_prompts, length_reward as _reward, random_policy_backbone

from rlfuse.engine.config import RunConfig
from rlfuse.engine.ppo import ppo_update, resolve_ppo_config
from rlfuse.engine.reward_scale import RewardScaler
from rlfuse.engine.rollout import sample_completions, score
from rlfuse.engine.step_values import Sampled, Scored, UpdateBatch, make_update_batch


TEXTS = ("say red", "a longer prompt here", "hi")


def _snapshot(value) -> dict:
    return {f.name: getattr(value, f.name).clone() for f in dataclasses.fields(value)
            if isinstance(getattr(value, f.name), torch.Tensor)}


def _assert_unchanged(value, snapshot):
    for name, before in snapshot.items():
        assert torch.equal(getattr(value, name), before), f"{type(value).__name__}.{name} was written to"


@pytest.fixture(scope="module")
def backbone():
    return random_policy_backbone()


def test_values_are_frozen_and_scoring_leaves_the_sample_alone(backbone):
    sampled = sample_completions(backbone, chat_prompts(backbone.tokenizer, TEXTS), n_samples=2, max_new_tokens=5, seed=3)
    assert type(sampled) is Sampled and sampled.truncated.dtype == torch.bool
    before = _snapshot(sampled)
    scored = score(backbone, sampled, reward_fn=_reward, values="policy")
    _assert_unchanged(sampled, before)
    assert type(scored) is Scored and scored.input_ids is sampled.input_ids
    assert scored.logp.shape == scored.values.shape == sampled.response_mask.shape
    for value, name in ((sampled, "input_ids"), (scored, "logp")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(value, name, None)
    with pytest.raises(ValueError, match="values from the policy's pass need with_policy=True"):
        score(backbone, sampled, reward_fn=_reward, values="policy", with_policy=False)


@pytest.mark.parametrize("advantage, reuse", [("gae", False), ("grpo", False), ("grpo", True)])
def test_the_update_batch_places_the_kl_once_and_the_update_writes_nothing_back(backbone, advantage, reuse):
    n = 2
    c = dataclasses.replace(RunConfig().ppo, advantage=advantage, n_samples=n, kl_coef=0.1, ppo_epochs=1,
                            minibatch_size=6 if reuse else 4, micro_batch_size=None, reward_norm="none")
    c = resolve_ppo_config(c, use_reward_model=False)
    sampled = sample_completions(backbone, chat_prompts(backbone.tokenizer, TEXTS), n_samples=n, max_new_tokens=5, seed=4)
    scored = score(backbone, sampled, reward_fn=_reward, values="policy" if advantage == "gae" else None,
                   with_policy=not reuse)
    scored_before = _snapshot(scored)
    scaler = RewardScaler("none", clip=None, missing_eos_penalty=1.0)
    batch = make_update_batch(scored, c, scaler=scaler, kl_coef=0.1)
    _assert_unchanged(scored, scored_before)
    assert type(batch) is UpdateBatch and torch.equal(batch.raw_scores, scored.scores)
    torch.testing.assert_close(batch.scores, scored.scores - 1.0 * scored.truncated.float())  # the EOS penalty
    assert batch.loss_kl_coef == (0.1 if c.kl_in_loss else 0.0)  # grpo: in the loss; gae: in the reward
    assert (batch.returns is None) == (advantage != "gae")

    batch_before = _snapshot(batch)
    params = [p for p in backbone.adapter_parameters("policy")] + list(backbone.value_head.parameters())
    start = [p.detach().clone() for p in params]
    try:
        result = ppo_update(backbone, torch.optim.SGD(params, lr=0.1), batch, c)
    finally:
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
    _assert_unchanged(batch, batch_before)
    assert result.stats["grad_norm"] > 0
    if reuse:  # the update's forward gave the old log-probs: they come back in the result, not in the batch
        assert batch.logp is None and result.old_logp is not None
        torch.testing.assert_close(result.old_logp, score(backbone, sampled, reward_fn=_reward, values=None).logp,
                                   atol=1e-5, rtol=1e-5)
    else:
        assert result.old_logp is None
