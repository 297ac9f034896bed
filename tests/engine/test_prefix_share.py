"""Prefix sharing (engine/prefix_share.py): the shared forward is the plain forward, values and
LoRA gradients, with gradient checkpointing on or off."""

import pytest
import torch

from rlfuse.engine.backbone import load_backbone
from rlfuse.engine.config import ModelConfig
from rlfuse.engine.data import pad
from rlfuse.engine.prefix_share import completion_hidden_states, plain_completion_hidden_states, prompt_groups


def _backbone(grad_ckpt: bool, dtype=torch.float32):
    bb = load_backbone(ModelConfig(gradient_checkpointing=grad_ckpt), device="cpu", adapters=["policy"])
    bb.model.to(dtype)
    bb.set_trainable(["policy"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a LoRA update that is not zero, so its gradients are not trivially 0
        for p in bb.adapter_parameters("policy"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return bb


def _batch(bb, n_samples: int, R: int = 7, seed: int = 0):
    """Rollout layout: left-padded prompts (different lengths) x n_samples, then R tokens, some
    rows right-padded after an early 'EOS' (mask 0)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (5, 9, 3)]
    ids, attn = pad([p for p in prompts for _ in range(n_samples)], bb.tokenizer.pad_token_id, side="left")
    B = ids.shape[0]
    completion = torch.randint(3, 200, (B, R), generator=g)
    cmask = torch.ones(B, R, dtype=attn.dtype)
    cmask[1, 4:] = 0
    cmask[-1, 2:] = 0
    completion = completion.masked_fill(cmask == 0, bb.tokenizer.pad_token_id)
    return torch.cat([ids, completion], 1), torch.cat([attn, cmask], 1), ids.shape[1], cmask


def test_prompt_groups_finds_the_distinct_prompts():
    ids = torch.tensor([[0, 5, 6, 1], [0, 5, 6, 2], [7, 8, 9, 3], [0, 5, 6, 4]])
    attn = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]])
    u_ids, u_mask, inverse = prompt_groups(ids, attn, 3)
    assert u_ids.shape == (2, 3)
    assert torch.equal(u_ids[inverse], ids[:, :3]) and torch.equal(u_mask[inverse], attn[:, :3])


@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_shared_forward_matches_plain_values_and_lora_grads(grad_ckpt):
    # float64 weights (Llama's RMSNorm and rotary tables still round through float32: ~1e-7 relative)
    bb = _backbone(grad_ckpt, torch.float64)
    ids, attn, P, cmask = _batch(bb, n_samples=4)
    bb.train()
    params = bb.adapter_parameters("policy")
    w = torch.randn(ids.shape[0], ids.shape[1] - P, bb.base.config.hidden_size, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    out = {}
    for name, fn in (("plain", plain_completion_hidden_states), ("shared", completion_hidden_states)):
        for p in params:
            p.grad = None
        with bb.use("policy"):
            h = fn(bb.decoder, ids, attn, P)
        ((h * w * cmask[..., None]).sum()).backward()
        out[name] = (h.detach(), [p.grad.clone() for p in params])
    (h0, g0), (h1, g1) = out["plain"], out["shared"]
    assert h1.shape == h0.shape == (ids.shape[0], ids.shape[1] - P, bb.base.config.hidden_size)
    m = cmask.bool()
    torch.testing.assert_close(h1[m], h0[m], rtol=1e-6, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in g0)
    for a, b in zip(g1, g0):  # a gradient lost through the shared prompt KV would be off by O(1)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))
    # the layers' checkpointing flags are restored
    flags = [m.gradient_checkpointing for m in bb.decoder.modules() if hasattr(m, "_gradient_checkpointing_func")]
    assert all(flags) if grad_ckpt else not any(flags)


@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_completion_pass_stays_checkpointed(grad_ckpt):
    """With checkpointing on, the completion pass (most of the tokens) is replayed in the
    backward (a read-only prompt cache survives the replay); the prompt pass is not."""
    bb = _backbone(grad_ckpt)
    ids, attn, P, cmask = _batch(bb, n_samples=4)
    bb.train()
    # the first layer's attention: a checkpoint replays the layer's forward, which calls it again
    attention = bb.decoder.layers[0].self_attn
    rows = []

    def seen(mod, args, kwargs):
        rows.append((args[0] if args else kwargs["hidden_states"]).shape[:2])

    handle = attention.register_forward_pre_hook(seen, with_kwargs=True)
    try:
        with bb.use("policy"):
            h = completion_hidden_states(bb.decoder, ids, attn, P)
        calls_forward = len(rows)
        (h * cmask[..., None]).sum().backward()
    finally:
        handle.remove()
    assert calls_forward == 2  # the prompt pass, then the completion pass
    completion = torch.Size([ids.shape[0], ids.shape[1] - P - 1])
    replays = rows[calls_forward:]
    assert replays == ([completion] if grad_ckpt else []), rows
    assert not any("_can_checkpoint_with_cache" in vars(m) for m in bb.decoder.modules())  # restored


def test_shared_forward_no_grad_and_unique_prompts():
    bb = _backbone(False)
    bb.train(False)
    for n_samples in (1, 3):  # 1: no prompt repeats, the plain forward itself
        ids, attn, P, cmask = _batch(bb, n_samples=n_samples, seed=2)
        with torch.no_grad():
            h0 = plain_completion_hidden_states(bb.decoder, ids, attn, P)
            h1 = bb.completion_hidden_states(ids, attn, P)
        torch.testing.assert_close(h1[cmask.bool()], h0[cmask.bool()], rtol=1e-5, atol=1e-5)


def test_one_token_completion_and_bad_prompt_len():
    bb = _backbone(False)
    ids, attn, P, _ = _batch(bb, n_samples=2, R=1)
    with torch.no_grad():
        torch.testing.assert_close(bb.completion_hidden_states(ids, attn, P),
                                   plain_completion_hidden_states(bb.decoder, ids, attn, P), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prompt_len"):
        bb.completion_hidden_states(ids, attn, ids.shape[1])


# ----------------------------------------------------------------------------- micro-batching

def test_micro_batches_keep_prompt_groups_together():
    from rlfuse.engine.ppo import micro_batches

    idx = torch.tensor([7, 0, 5, 1, 4, 6, 2, 3])  # rows of prompts 0..3, G=2
    assert [m.tolist() for m in micro_batches(idx, 2, None)] == [idx.tolist()]
    assert [m.tolist() for m in micro_batches(idx, 2, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [m.tolist() for m in micro_batches(idx, 2, 3)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [m.tolist() for m in micro_batches(torch.tensor([0, 1, 2, 5]), 4, 2)] == [[0, 1], [2, 5]]


@pytest.mark.parametrize("agg,critic", [("token-mean", False), ("seq-mean-token-mean", False),
                                        ("seq-mean-token-sum-norm", False), ("token-mean", True)])
def test_micro_batched_update_is_the_one_batch_update(agg, critic):
    import dataclasses

    from rlfuse.engine.advantages import compute_advantages
    from rlfuse.engine.config import RunConfig
    from rlfuse.engine.ppo import ppo_update, resolve_loss_options
    from rlfuse.engine.rollout import Rollout, score_rollout
    from rlfuse.engine.step_values import UpdateBatch

    bb = _backbone(False)
    ids, attn, P, cmask = _batch(bb, n_samples=2, R=6)
    B = ids.shape[0]
    ro = Rollout(input_ids=ids, attention_mask=attn, prompt_len=P, response_mask=cmask.float(),
                 prompts=["p"] * B, completions=["c"] * B)
    score_rollout(bb, ro, reward_fn=lambda p, c: [float(i % 3) for i in range(len(c))], with_values=critic)
    estimator = "gae" if critic else "grpo"
    adv, ret = compute_advantages(ro, estimator=estimator, n_samples=2, kl_coef=0.1, kl_in_loss=not critic)
    if critic:
        bb.set_trainable(["policy"])
    params = bb.adapter_parameters("policy") + (list(bb.value_head.parameters()) if critic else [])
    for p in params:
        p.requires_grad_(True)
    start = [p.detach().clone() for p in params]
    base = dataclasses.replace(RunConfig().ppo, advantage=estimator, n_samples=2, ppo_epochs=1, minibatch_size=B,
                               kl_coef=0.1, loss_agg=agg, entropy_coef=0.01)
    deltas, stats = {}, {}
    for mbs in (None, 2, 3):  # 3: the micro-batches hold one group (2 rows) each
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
        c = resolve_loss_options(dataclasses.replace(base, micro_batch_size=mbs))
        batch = UpdateBatch.of(ro, adv, ret, loss_kl_coef=0.1 if c.kl_in_loss else 0.0)
        stats[mbs] = ppo_update(bb, torch.optim.SGD(params, lr=0.5), batch, c).stats
        deltas[mbs] = [p.detach() - s for p, s in zip(params, start)]
    assert sum(float(d.abs().sum()) for d in deltas[None]) > 1e-3
    for mbs in (2, 3):
        for a, b in zip(deltas[mbs], deltas[None]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
        for k in ("loss", "policy_loss", "kl", "entropy") + (("value_loss",) if critic else ()):
            assert stats[mbs][k] == pytest.approx(stats[None][k], rel=1e-4, abs=1e-6), k


def test_micro_batch_size_is_validated():
    import dataclasses

    from rlfuse.engine.config import RunConfig, load_config, validate
    from rlfuse.engine.ppo import ppo_update

    with pytest.raises(ValueError, match="ppo.micro_batch_size"):
        validate(load_config(None, {"ppo": {"micro_batch_size": 0}}))
    assert validate(load_config(None, {"ppo": {"micro_batch_size": None}})).ppo.micro_batch_size is None
    c = dataclasses.replace(RunConfig().ppo, micro_batch_size=-1)
    with pytest.raises(ValueError, match="ppo.micro_batch_size must be a positive integer"):
        ppo_update(None, None, None, c)
