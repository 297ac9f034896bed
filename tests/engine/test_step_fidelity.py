"""Three silent faults of the PPO step, each pinned by a test that failed before its fix.

1. Gradient checkpointing recomputes a layer during backward, and peft's LoRA layers read the
   adapter active THEN: the critic's backward (critic=adapter) must run under the value
   adapter, or its gradients are those of a forward that never happened.
2. LoRA on the output layer: the sampler calls the head module (LoRA included) while scoring
   and training read its base weight, so it is refused before a model loads.
3. The fallback chat template: prompt tokens + answer tokens are the tokens of the whole chat,
   so SFT, the reward model and PPO see one layout.
"""

from __future__ import annotations

import pytest
import torch

from rlfuse.engine import distributed as D
from rlfuse.engine.backbone import DEFAULT_CHAT_TEMPLATE, load_backbone, load_tokenizer
from rlfuse.engine.config import ModelConfig, PPOConfig, RunConfig, apply_overrides, validate
from rlfuse.engine.data import encode_conversation, encode_prompt, reward_ids
from rlfuse.engine.ppo import POLICY, VALUE, ppo_update
from rlfuse.engine.rollout import Rollout
from rlfuse.engine.step_values import UpdateBatch


def _backbone(checkpointing: bool):
    cfg = ModelConfig(name_or_path="tiny", gradient_checkpointing=checkpointing)
    bb = load_backbone(cfg, device="cpu", adapters=[POLICY, VALUE])
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # distinct, non-zero adapters: a recompute under the wrong one shows
        for name in (POLICY, VALUE):
            for p in bb.adapter_parameters(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for p in bb.value_head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    bb.value_head.requires_grad_(True)
    bb.set_trainable([POLICY, VALUE])
    return bb


def _rollout(n_samples: int) -> tuple[Rollout, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    n_prompts, P, R = 2, 5, 4
    prompts = torch.randint(10, 200, (n_prompts, P), generator=g)
    prompt_ids = prompts.repeat_interleave(n_samples, 0)  # groups share a prompt: prefix-shared path
    B = len(prompt_ids)
    completion = torch.randint(10, 200, (B, R), generator=g)
    attn = torch.ones(B, P + R, dtype=torch.long)
    attn[0, :2] = 0  # left padding on one prompt
    response_mask = torch.ones(B, R)
    response_mask[1, 3:] = 0  # a completion that ended early
    attn[1, P + 3:] = 0
    ro = Rollout(input_ids=torch.cat([prompt_ids, completion], 1), attention_mask=attn, prompt_len=P,
                 response_mask=response_mask, prompts=["p"] * B, completions=["c"] * B)
    ro.logp = -torch.rand(B, R, generator=g) * 3 * response_mask
    ro.ref_logp = -torch.rand(B, R, generator=g) * 3 * response_mask
    ro.entropy = torch.zeros(B, R)
    ro.values = torch.randn(B, R, generator=g) * response_mask
    adv = torch.randn(B, R, generator=g) * response_mask
    ret = torch.randn(B, R, generator=g) * response_mask
    return ro, adv, ret


def _update_grads(monkeypatch, checkpointing: bool, critic: str, n_samples: int) -> dict[str, torch.Tensor]:
    bb = _backbone(checkpointing)
    names = {id(p): n for n, p in bb.model.named_parameters()}
    names.update({id(p): "value_head." + n for n, p in bb.value_head.named_parameters()})
    params = bb.adapter_parameters(POLICY) + list(bb.value_head.parameters())
    if critic == "adapter":
        params += bb.adapter_parameters(VALUE)
    opt = torch.optim.SGD(params, lr=0.0)
    seen: dict[str, torch.Tensor] = {}
    clip = D.clip_grad_norm_

    def recording(ps, max_norm):
        seen.update({names[id(p)]: p.grad.detach().clone() for p in ps if p.grad is not None})
        return clip(ps, max_norm)

    ro, adv, ret = _rollout(n_samples)
    c = PPOConfig(critic=critic, n_samples=n_samples, ppo_epochs=1, minibatch_size=len(ro), micro_batch_size=None,
                  value_coef=0.5, kl_coef=0.0, entropy_coef=0.0)
    with monkeypatch.context() as patch:
        patch.setattr(D, "clip_grad_norm_", recording)
        ppo_update(bb, opt, UpdateBatch.of(ro, adv, ret), c)
    return seen


@pytest.mark.parametrize("critic", ["shared", "adapter"])
@pytest.mark.parametrize("n_samples", [1, 2], ids=["plain", "prefix-shared"])
def test_update_gradients_do_not_depend_on_checkpointing(monkeypatch, critic, n_samples):
    off = _update_grads(monkeypatch, False, critic, n_samples)
    on = _update_grads(monkeypatch, True, critic, n_samples)
    assert off.keys() == on.keys()
    value_keys = [k for k in off if f".{VALUE}." in k or k.startswith("value_head.")]
    assert value_keys and any(f".{POLICY}." in k for k in off)
    if critic == "adapter":
        assert any(f".{VALUE}." in k for k in value_keys)
    for k in off:
        torch.testing.assert_close(on[k], off[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
        assert off[k].abs().sum() > 0, k


# --------------------------------------------------------------------------- 2. output-layer LoRA

@pytest.mark.parametrize("targets", ["q_proj,lm_head", "lm_head", "model.lm_head", " v_proj , embed_out"])
def test_lora_on_the_output_layer_is_refused_before_a_model_loads(targets):
    cfg = apply_overrides(RunConfig(), {"model.lora_target_modules": targets})
    with pytest.raises(ValueError, match=r"model\.lora_target_modules.*output layer") as err:
        validate(cfg)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="output layer"):  # the programmatic path refuses it too
        load_backbone(cfg.model, device="cpu")


def test_all_linear_and_inner_layers_are_accepted():
    for targets in ("all-linear", "q_proj,v_proj", "lm_head_proj"):
        validate(apply_overrides(RunConfig(), {"model.lora_target_modules": targets}))


# --------------------------------------------------------------------------- 3. fallback template

@pytest.mark.parametrize("answer", ["hello", " spaced", "4-2 = 2 and 3-1 = 2", "x\ny"])
def test_fallback_template_gives_one_layout_to_sft_reward_and_ppo(answer):
    tok = load_tokenizer(ModelConfig(name_or_path="tiny"))
    tok.chat_template = DEFAULT_CHAT_TEMPLATE  # the template of a tokenizer that brings none
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What's 4-2?"}]
    chat = msgs + [{"role": "assistant", "content": answer}]
    full = tok.apply_chat_template(chat, tokenize=False)
    ids, mask = encode_conversation(tok, chat)  # SFT
    assert ids == tok(full, add_special_tokens=False)["input_ids"]
    prompt = encode_prompt(tok, msgs)  # what PPO samples after
    answer_ids = tok(answer, add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    # SFT's target tokens start with the answer's own tokens, then the EOS: what PPO samples
    assert ids[:len(prompt)] == prompt and ids[len(prompt):len(prompt) + len(answer_ids) + 1] == answer_ids + [eos]
    assert mask[len(prompt)] == 1 and mask[len(prompt) - 1] == 0
    # the reward model trains and scores on the same tokens, read at that EOS
    assert reward_ids(tok, msgs, answer, 10_000) == prompt + answer_ids + [eos]
