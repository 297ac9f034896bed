import pytest
import torch

from rlfuse.engine.advantages import (compute_advantages, gae_advantages, grpo_advantages, rloo_advantages,
                                      shaped_token_rewards)
from rlfuse.engine.ppo import KLController
from rlfuse.engine.rollout import Rollout


def test_grpo_hand_computed():
    # groups of n=3: [1, 2, 3] has mean 2 and (Bessel) std 1; [5, 5, 5] has std 0 -> all zero, no NaN
    adv = grpo_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), n_samples=3)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]), atol=1e-5, rtol=0)


def test_rloo_hand_computed():
    # each sample minus the mean of the other two: 1-(2+3)/2, 2-(1+3)/2, 3-(1+2)/2
    adv = rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), n_samples=3)
    torch.testing.assert_close(adv, torch.tensor([-1.5, 0.0, 1.5, 0.0, 0.0, 0.0]))
    # n=2: the other sample is the whole baseline
    torch.testing.assert_close(rloo_advantages(torch.tensor([4.0, 1.0]), 2), torch.tensor([3.0, -3.0]))


def test_group_estimators_need_groups():
    with pytest.raises(ValueError, match="n_samples >= 2"):
        grpo_advantages(torch.ones(4), 1)
    with pytest.raises(ValueError, match="groups of 3"):
        rloo_advantages(torch.ones(4), 3)


def _rollout(scores, logp, ref, mask, values=None):
    B, R = mask.shape
    ro = Rollout(torch.zeros(B, R + 1, dtype=torch.long), torch.ones(B, R + 1, dtype=torch.long), 1, mask,
                 [""] * B, [""] * B)
    ro.scores, ro.logp, ro.ref_logp, ro.values = scores, logp, ref, values
    return ro


def test_kl_shaped_token_rewards():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    logp = torch.full((2, 4), -1.0)
    ref = torch.full((2, 4), -1.5)  # k1 = 0.5 per token
    r = shaped_token_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, kl_coef=0.1)
    expected = torch.tensor([[-0.05, -0.05, 2.0 - 0.05, 0.0], [-0.05, -1.0 - 0.05, 0.0, 0.0]])
    torch.testing.assert_close(r, expected)


def test_gae_lambda_one_is_return_minus_value():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.25, 0.0, 0.0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0, whiten=False)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.75, 1.0, 0.0]]))
    torch.testing.assert_close(ret * mask, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))


def test_group_advantage_with_kl_shaping_and_broadcast():
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    logp, ref = torch.zeros(2, 2), torch.tensor([[-1.0, -1.0], [0.0, 0.0]])  # seq KL: 2 and 0
    ro = _rollout(torch.tensor([1.0, 1.0]), logp, ref, mask)
    adv, ret = compute_advantages(ro, estimator="rloo", n_samples=2, kl_coef=0.5, kl_in_loss=False)
    # shaped scores 1 - 0.5*2 = 0 and 1 - 0 = 1 -> rloo [-1, 1], on valid tokens only
    torch.testing.assert_close(adv, torch.tensor([[-1.0, -1.0], [1.0, 0.0]]))
    assert ret is None
    adv, _ = compute_advantages(ro, estimator="rloo", n_samples=2, kl_coef=0.5, kl_in_loss=True)
    torch.testing.assert_close(adv, torch.zeros(2, 2))  # KL left to the loss: equal scores, no signal


def test_adaptive_kl_controller():
    ctl = KLController(0.1, adaptive=True, target=6.0, horizon=1000)
    ctl.update(kl=12.0, n_samples=100)  # error clipped to +0.2
    assert ctl.coef == pytest.approx(0.1 * 1.02)
    ctl.update(kl=3.0, n_samples=100)  # error -0.5 clipped to -0.2
    assert ctl.coef == pytest.approx(0.1 * 1.02 * 0.98)
    fixed = KLController(0.1)
    fixed.update(kl=100.0, n_samples=100)
    assert fixed.coef == 0.1
