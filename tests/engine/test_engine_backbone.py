"""The shared backbone: roles, step-0 KL, and the fused LM-head path."""

import pytest
import torch

from rlfuse.engine.backbone import load_backbone, position_ids_from_mask
from rlfuse.engine.checkpoint import save_checkpoint
from rlfuse.engine.config import ModelConfig, RunConfig
from rlfuse.engine.data import Prompt, pad
from rlfuse.engine.ppo import build_ppo_backbone, ppo_update
from rlfuse.engine.rollout import generate_rollout, score_rollout
from rlfuse.engine.step_values import UpdateBatch
from rlfuse.engine.advantages import compute_advantages


def _prompts(tok, texts=("say red", "a much longer prompt here", "hi")):
    out = []
    for t in texts:
        msgs = [{"role": "user", "content": t}]
        rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        out.append(Prompt(t, rendered, tok(rendered, add_special_tokens=False)["input_ids"]))
    return out


def _zero_reward(prompts, completions):
    return [0.0] * len(completions)


def _rollout(bb, n_samples=2, max_new_tokens=6):
    torch.manual_seed(0)
    ro = generate_rollout(bb, _prompts(bb.tokenizer), n_samples=n_samples, max_new_tokens=max_new_tokens)
    return score_rollout(bb, ro, reward_fn=_zero_reward)


def _fake_sft_checkpoint(run_dir):
    """An SFT adapter far from zero, saved where PPO looks for it."""
    bb = load_backbone(ModelConfig(), device="cpu", adapters=["sft"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in bb.adapter_parameters("sft"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    save_checkpoint(run_dir / "sft", 1, adapter=bb.adapter_state_dict("sft"),
                    adapter_config=bb.adapter_config_dict(), heads={}, trainer_state={"step": 1, "done": True})


def test_step0_kl_is_zero_without_sft(tmp_path):
    bb, sources = build_ppo_backbone(RunConfig(run_dir=str(tmp_path)), "cpu", use_reward_model=False)
    assert sources["sft_checkpoint"] is None and bb.reference_adapter is None  # reference = bare base
    ro = _rollout(bb)
    mask = ro.response_mask.bool()
    assert mask.any() and (ro.logp[mask] < 0).all()
    assert (ro.logp - ro.ref_logp).abs().max().item() <= 1e-6


def test_step0_kl_is_zero_with_sft_and_reference_is_sft(tmp_path):
    _fake_sft_checkpoint(tmp_path)
    bb, sources = build_ppo_backbone(RunConfig(run_dir=str(tmp_path)), "cpu", use_reward_model=False)
    assert sources["sft_checkpoint"].endswith("ckpt-0000001") and bb.reference_adapter == "sft"
    ro = _rollout(bb)
    assert (ro.logp - ro.ref_logp).abs().max().item() <= 1e-6
    # ...and the reference really is the SFT adapter, not the base model
    P = ro.prompt_len
    with torch.no_grad(), bb.use(None):
        base = bb.token_logprobs(bb.hidden_states(ro.input_ids, ro.attention_mask)[:, P - 1: -1], ro.labels)
    assert ((base - ro.ref_logp) * ro.response_mask).abs().max().item() > 1e-3


def test_scoring_and_training_never_call_the_lm_head(tmp_path):
    bb, _ = build_ppo_backbone(RunConfig(run_dir=str(tmp_path)), "cpu", use_reward_model=False)
    calls = []
    handle = bb.lm_head.register_forward_hook(lambda *a: calls.append(1))
    torch.manual_seed(0)
    ro = generate_rollout(bb, _prompts(bb.tokenizer), n_samples=2, max_new_tokens=4)
    assert calls, "the hook must see generate's LM-head calls (else this test proves nothing)"
    calls.clear()
    # a non-zero score: the value head starts at zero, so the value loss then has a gradient
    score_rollout(bb, ro, reward_fn=lambda prompts, completions: [1.0] * len(completions))
    adv, ret = compute_advantages(ro, estimator="gae", n_samples=2, kl_coef=0.1, kl_in_loss=False)
    cfg = RunConfig().ppo
    from rlfuse.engine.optim import make_optimizer
    opt = make_optimizer(bb.adapter_parameters("policy") + list(bb.value_head.parameters()), lr=1e-3)
    stats = ppo_update(bb, opt, UpdateBatch.of(ro, adv, ret), cfg).stats  # gae: the KL is in the reward
    handle.remove()
    assert calls == [] and stats["grad_norm"] > 0


def test_fused_logprobs_match_the_logits_path():
    bb = load_backbone(ModelConfig(), device="cpu", adapters=["policy"])
    with torch.no_grad():
        for p in bb.adapter_parameters("policy"):
            p.add_(0.1)
    ids, mask = pad([[5, 40, 41, 42, 43, 2], [5, 50, 51]], bb.tokenizer.pad_token_id, side="left")
    with torch.no_grad(), bb.use("policy"):
        fused = bb.token_logprobs(bb.hidden_states(ids, mask)[:, :-1], ids[:, 1:], temperature=0.7)
        logits = bb.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    ref = torch.log_softmax(logits[:, :-1].float() / 0.7, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    valid = mask[:, 1:].bool()
    torch.testing.assert_close(fused[valid], ref[valid], atol=1e-5, rtol=1e-5)


def test_adapter_roles_and_trainable_sets():
    bb = load_backbone(ModelConfig(), device="cpu", adapters=["policy", "sft", "reward"])
    bb.set_trainable(["policy"])
    with torch.no_grad():
        for p in bb.adapter_parameters("sft"):
            p.add_(0.05)
    ids, mask = pad([[5, 40, 41, 42]], 0)
    with torch.no_grad():
        with bb.use("policy"):
            h_policy = bb.hidden_states(ids, mask)
        with bb.use("sft"):
            h_sft = bb.hidden_states(ids, mask)
            assert bb.model.active_adapter == "sft"
        with bb.use(None):
            h_base = bb.hidden_states(ids, mask)
    torch.testing.assert_close(h_policy, h_base)  # fresh LoRA: B = 0
    assert not torch.allclose(h_sft, h_base)
    assert bb.model.active_adapter == "policy"  # context restored the previous adapter
    grads = {n for n in ("policy", "sft", "reward") if any(p.requires_grad for p in bb.adapter_parameters(n))}
    assert grads == {"policy"}  # peft's set_adapter must not leave sft/reward trainable
    assert not any(p.requires_grad for n, p in bb.model.named_parameters() if "lora_" not in n)


def test_local_directory_loads_like_the_preset(tmp_path):
    from rlfuse.engine import tiny

    tok = tiny.build_tokenizer()
    tiny.build_model(tok).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    a = load_backbone(ModelConfig(), device="cpu")
    b = load_backbone(ModelConfig(name_or_path=str(tmp_path / "m")), device="cpu")
    ids, mask = pad([[5, 40, 41, 42]], 0)
    with torch.no_grad():
        torch.testing.assert_close(a.hidden_states(ids, mask), b.hidden_states(ids, mask))
    assert b.tokenizer.chat_template == tok.chat_template


@pytest.mark.parametrize("name", ["no/such/model_dir", "missing.gguf"])
def test_missing_model_is_a_clear_error(tmp_path, name):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_backbone(ModelConfig(name_or_path=str(tmp_path / name)), device="cpu")


def _sft_grads(model_cfg):
    from rlfuse.engine.sft import sft_loss

    torch.manual_seed(0)  # same LoRA A init for every call
    bb = load_backbone(model_cfg, device="cpu", adapters=["sft"])
    bb.set_trainable(["sft"])
    bb.train()
    with torch.no_grad():
        for p in bb.adapter_parameters("sft"):
            p.add_(0.01)  # B != 0 so every LoRA factor gets a gradient
    ids, mask = pad([[5, 40, 41, 42, 2], [5, 50]], 0)
    with bb.use("sft"):
        loss, _ = sft_loss(bb, ids, mask, mask)
    loss.backward()
    return bb, loss.detach(), torch.cat([p.grad.flatten() for p in bb.adapter_parameters("sft")])


def test_gradient_checkpointing_gives_the_same_gradients():
    bb, loss, grads = _sft_grads(ModelConfig(gradient_checkpointing=True))
    assert bb.base.get_decoder().gradient_checkpointing
    _, loss_ref, grads_ref = _sft_grads(ModelConfig())
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(grads, grads_ref)


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantized_base_trains_lora(bits):
    pytest.importorskip("bitsandbytes")
    bb, loss, grads = _sft_grads(ModelConfig(quantization=bits))
    layer = bb.base.get_decoder().layers[0].self_attn.q_proj.base_layer
    assert type(layer).__name__ == {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}[bits]
    assert bb.quantized and torch.isfinite(loss) and grads.abs().sum() > 0


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_ppo_update_moves_logprobs_along_the_advantage(tmp_path, sign):
    """Wiring check for the update: old log-probs, advantages and mask line up with the
    tokens, so a positive advantage on a completion makes it more likely, a negative one less."""
    bb, _ = build_ppo_backbone(RunConfig(run_dir=str(tmp_path)), "cpu", use_reward_model=False)
    ro = _rollout(bb)
    advantages = torch.zeros_like(ro.logp)
    advantages[0] = sign * ro.response_mask[0]  # only completion 0 gets a signal
    cfg = RunConfig().ppo
    cfg.ppo_epochs, cfg.minibatch_size = 1, len(ro)
    # plain SGD: a small step along -grad lowers the loss to first order (Adam's first step is
    # sign(grad), which also moves parameters whose gradient is only rounding noise)
    opt = torch.optim.SGD(bb.adapter_parameters("policy"), lr=0.1)
    ppo_update(bb, opt, UpdateBatch.of(ro, advantages, None), cfg)
    before = (ro.logp[0] * ro.response_mask[0]).sum()
    after = (score_rollout(bb, ro, reward_fn=_zero_reward, with_values=False).logp[0] * ro.response_mask[0]).sum()
    assert sign * (after - before) > 1e-4


def test_rollout_logprobs_are_those_of_the_sampling_distribution(tmp_path):
    """Scored log-probs (left-padded prompts, temperature) == generate's own sampling scores,
    so PPO's old_logp is truly on-policy."""
    from rlfuse.engine.rollout import Rollout

    bb, _ = build_ppo_backbone(RunConfig(run_dir=str(tmp_path)), "cpu", use_reward_model=False)
    with torch.no_grad():
        for p in bb.adapter_parameters("policy"):
            p.add_(0.05)  # a policy that differs from the base
    prompts = _prompts(bb.tokenizer)
    ids, attn = pad([p.input_ids for p in prompts], bb.tokenizer.pad_token_id, side="left")
    bb.model.eval()
    torch.manual_seed(0)
    with torch.no_grad(), bb.use("policy"):
        out = bb.model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=0.7, top_k=0,
                                top_p=1.0, max_new_tokens=5, pad_token_id=0,
                                output_scores=True, return_dict_in_generate=True)
    P, seq = ids.shape[1], out.sequences
    sampled = torch.stack([torch.log_softmax(s.float(), -1).gather(-1, seq[:, P + i, None]).squeeze(-1)
                           for i, s in enumerate(out.scores)], 1)
    is_eos = seq[:, P:] == bb.tokenizer.eos_token_id
    mask = ((is_eos.long().cumsum(1) - is_eos.long()) == 0).float()  # up to the first EOS
    ro = Rollout(seq, torch.cat([attn, mask.long()], 1), P, mask, [p.raw for p in prompts], [""] * len(prompts))
    score_rollout(bb, ro, temperature=0.7, reward_fn=_zero_reward, with_values=False)
    torch.testing.assert_close(ro.logp, sampled * mask, atol=1e-5, rtol=1e-5)
