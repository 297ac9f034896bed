"""The engine's own sampler: exactly softmax(logits / T), reproducible per row key, finished rows dropped."""

import math

import pytest
import torch
from engine_helpers import chat_prompts

from rlfuse.engine.backbone import load_backbone
from rlfuse.engine.config import ModelConfig
from rlfuse.engine.data import Prompt, pad
from rlfuse.engine.rollout import generate_rollout, score_rollout
from rlfuse.engine.sampler import final_logits, prefill_tokens, sample, sample_tokens

TEXTS = ("say red", "a much longer prompt here, with more words", "hi", "two words")


def _prompts(tok, texts=TEXTS):
    return chat_prompts(tok, texts)


def _zero_reward(prompts, completions):
    return [0.0] * len(completions)


@pytest.fixture(scope="module")
def bb():
    bb = load_backbone(ModelConfig(), device="cpu", adapters=["policy"])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a policy far from the base, so the adapter visibly matters
        for p in bb.adapter_parameters("policy"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return bb


def _tv_bound(p: torch.Tensor, n: int) -> float:
    """E[TV(empirical, p)] <= 1/2 sum sqrt(p/n); TV moves by <= 1/n per sample, so (McDiarmid)
    exceeding the mean by 0.06 has probability <= exp(-2 n 0.06^2) (< 1e-12 at n = 4000)."""
    return 0.5 * float(torch.sqrt(p / n).sum()) + 0.06


def test_first_token_follows_the_scored_softmax_whatever_the_generation_config(bb):
    tok, T, n = bb.tokenizer, 0.8, 4000
    prompt = _prompts(tok, ["say red"])[0]
    ids = torch.tensor([prompt.input_ids] * n)
    attn = torch.ones_like(ids)
    with torch.no_grad(), bb.use("policy"):  # the scored distribution of the first completion token
        h = bb.hidden_states(ids[:1], attn[:1])[:, -1]
        p = torch.softmax(bb.lm_head(h).float() / T, -1)[0]
    gc = bb.base.generation_config
    saved = {k: getattr(gc, k, None) for k in ("suppress_tokens", "repetition_penalty", "min_p")}
    allowed = p.topk(5).indices.tolist()
    gc.suppress_tokens = [i for i in range(len(p)) if i not in allowed]  # what a real checkpoint may ship
    gc.repetition_penalty, gc.min_p = 1.3, 0.05
    try:
        ours = bb.generate(ids, attn, max_new_tokens=1, temperature=T, row_keys=[(0, 0, 0, j) for j in range(n)])
        bb.model.eval()
        torch.manual_seed(0)
        with torch.no_grad(), bb.use("policy"):  # the old path: model.generate applies the config
            old = bb.model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=T, top_k=0,
                                    top_p=1.0, max_new_tokens=1, pad_token_id=tok.pad_token_id)
    finally:
        for k, v in saved.items():
            setattr(gc, k, v)
    P = ids.shape[1]

    def tv(samples):
        return 0.5 * float((torch.bincount(samples, minlength=len(p)).float() / n - p).abs().sum())

    assert p[allowed].sum() < 0.5  # the suppression really changes the distribution
    assert tv(ours[:, P]) <= _tv_bound(p, n)
    assert tv(old[:, P]) > 0.4, "the old generate path should have been off-policy here"


def test_sampled_logprobs_equal_the_scored_ones(bb):
    ro = generate_rollout(bb, _prompts(bb.tokenizer), n_samples=3, max_new_tokens=7, temperature=0.7, seed=5)
    sampled = ro.sample_logp.clone()
    score_rollout(bb, ro, temperature=0.7, reward_fn=_zero_reward, with_values=False)
    mask = ro.response_mask.bool()
    assert mask.sum() > 10 and (sampled[mask] < 0).all()
    torch.testing.assert_close(ro.logp, sampled, atol=2e-5, rtol=1e-5)


def test_a_prompt_alone_or_in_a_batch_gets_the_same_completions(bb):
    prompts = _prompts(bb.tokenizer)
    together = generate_rollout(bb, prompts, n_samples=2, max_new_tokens=8, seed=1, iteration=4,
                                prompt_indices=[10, 11, 12, 13])
    assert len({p.input_ids.__len__() for p in prompts}) > 1  # different padding inside the batch
    for i, prompt in enumerate(prompts):
        alone = generate_rollout(bb, [prompt], n_samples=2, max_new_tokens=8, seed=1, iteration=4,
                                 prompt_indices=[10 + i])
        assert alone.completions == together.completions[2 * i: 2 * i + 2]
    assert together.completions[0] != together.completions[1]  # samples of one prompt differ
    other = generate_rollout(bb, prompts, n_samples=2, max_new_tokens=8, seed=1, iteration=5,
                             prompt_indices=[10, 11, 12, 13])
    assert other.completions != together.completions  # the iteration is part of the key


def test_eager_and_compiled_decode_give_the_same_tokens(bb):
    ids, attn = pad([p.input_ids for p in _prompts(bb.tokenizer)], bb.tokenizer.pad_token_id, side="left")
    keys = [(7, 0, i, 0) for i in range(len(ids))]
    eager = sample(bb, ids, attn, max_new_tokens=6, row_keys=keys, compile=False)
    # aot_eager traces the same graph as inductor without its minutes-long C++ build on CPU
    compiled = sample(bb, ids, attn, max_new_tokens=6, row_keys=keys, compile="aot_eager")
    assert torch.equal(eager.tokens, compiled.tokens)
    torch.testing.assert_close(eager.logprobs, compiled.logprobs, atol=1e-5, rtol=1e-5)
    with pytest.warns(UserWarning, match="decoding eagerly"):  # a failing compile falls back, same tokens
        fallback = sample(bb, ids, attn, max_new_tokens=6, row_keys=keys, compile="no_such_backend")
    assert torch.equal(eager.tokens, fallback.tokens)


def test_finished_rows_leave_the_batch(bb, monkeypatch):
    import rlfuse.engine.sampler as sampler_mod

    monkeypatch.setattr(sampler_mod, "_MAX_BUCKETS", 1)  # one prefill call: the hook counts decode rows after it
    tok = bb.tokenizer
    ids, attn = pad([p.input_ids for p in _prompts(tok)], tok.pad_token_id, side="left")
    args = (bb.decoder, bb.lm_head, bb.base.config, ids, attn)
    kw = dict(max_new_tokens=6, pad_token_id=tok.pad_token_id, greedy=True)
    free = sample_tokens(*args, eos_token_ids=[tok.eos_token_id], **kw)
    assert not free.finished.any() and free.forward_rows == 4 * 5  # 5 decode steps after the prefill
    stop = int(free.tokens[0, 1])  # row 0 stops at its 2nd token; other rows may stop on it too
    rows_seen = []
    hook = bb.decoder.register_forward_pre_hook(lambda m, a, k: rows_seen.append(k["input_ids"].shape[0]),
                                                with_kwargs=True)
    try:
        out = sample_tokens(*args, eos_token_ids=[stop], **kw)
    finally:
        hook.remove()
    first_stop = [next((t for t in range(6) if free.tokens[r, t] == stop), 6) for r in range(4)]
    expected = sum(sum(1 for t in range(1, 6) if t <= s) for s in first_stop)  # step t runs while not stopped before
    assert out.finished[0] and out.forward_rows == expected == sum(rows_seen[1:]) < 4 * 5
    assert rows_seen[0] == 4  # the prefill
    assert (out.tokens[0, 2:] == tok.pad_token_id).all()  # pad after the EOS
    assert torch.equal(out.tokens[:, :2], free.tokens[:, :2])


def test_truncated_marks_rows_without_an_eos(bb, monkeypatch):
    eos_like = list(range(100, 263))  # most bytes end a row, so some rows finish and some may not
    monkeypatch.setattr(bb, "eos_token_ids", lambda: eos_like)
    ro = generate_rollout(bb, _prompts(bb.tokenizer), n_samples=4, max_new_tokens=3, seed=2)
    completion = ro.input_ids[:, ro.prompt_len:]
    has_eos = (torch.isin(completion, torch.tensor(eos_like)) & ro.response_mask.bool()).any(1)
    assert has_eos.any()
    assert torch.equal(ro.truncated, ~has_eos)


def test_logit_scale_and_softcap_apply_before_the_temperature():
    class Cfg:
        logit_scale, final_logit_softcapping = 0.5, 3.0

    head = torch.nn.Linear(4, 6, bias=False)
    h = torch.randn(2, 4)
    z = head(h) * 0.5
    expected = 3.0 * torch.tanh(z / 3.0) / 0.7
    torch.testing.assert_close(final_logits(h, head, Cfg(), 0.7), expected)
    torch.testing.assert_close(final_logits(h, head, object(), 0.7), head(h) / 0.7)  # none set: plain


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(top_k=50), "top_k=50 / top_p=None are not supported"),
    (dict(top_p=0.9), "top_p=0.9 are not supported"),
])
def test_bad_requests_get_a_clear_error(bb, kwargs, match):
    ids, attn = pad([p.input_ids for p in _prompts(bb.tokenizer)], bb.tokenizer.pad_token_id, side="left")
    kw = {"max_new_tokens": 4, "row_keys": [(0,)] * len(ids), **kwargs}
    with pytest.raises(ValueError, match=match):
        sample(bb, ids, attn, **kw)


def test_empty_and_too_long_prompts_get_a_clear_error(bb):
    with pytest.raises(ValueError, match="empty prompt list"):
        generate_rollout(bb, [], max_new_tokens=4)
    with pytest.raises(ValueError, match="empty prompt list"):
        bb.generate(torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3, dtype=torch.long), max_new_tokens=4)
    n_ctx = bb.base.config.max_position_embeddings
    long = Prompt("x", "x", [40] * (n_ctx - 2))
    with pytest.raises(ValueError, match=rf"exceeds the model's context \(max_position_embeddings={n_ctx}\)"):
        generate_rollout(bb, [long], max_new_tokens=4)
    assert math.isfinite(n_ctx)


@pytest.mark.parametrize("side", ["right", "hole"])
def test_prompts_that_are_not_left_padded_get_a_clear_error(bb, side):
    """The first new token is read at each row's last column, so a right-padded row (or a hole)
    would sample from a pad position: refused, naming the row."""
    ids, attn = pad([p.input_ids for p in _prompts(bb.tokenizer)], bb.tokenizer.pad_token_id,
                    side="right" if side == "right" else "left")
    if side == "hole":
        attn[0, -3] = 0
    bad = 0 if side == "hole" else int((attn.sum(1) < attn.shape[1]).nonzero()[0])
    with pytest.raises(ValueError, match=rf"prompt {bad} is not left-padded"):
        sample(bb, ids, attn, max_new_tokens=2, row_keys=[(0,)] * len(ids))


def _sample_recording_calls(bb, ids, attn, **kw):
    """``sample``'s output and the input_ids shape of every decoder call it made."""
    calls = []
    hook = bb.decoder.register_forward_pre_hook(lambda m, a, k: calls.append(tuple(k["input_ids"].shape)),
                                                with_kwargs=True)
    try:
        return sample(bb, ids, attn, **kw), calls
    finally:
        hook.remove()


def _prefill_calls(shapes):
    """The decoder calls of a prefill: those before the first one-token (decode) call."""
    return [tuple(x) for x in shapes[:next(i for i, x in enumerate(shapes) if x[1] == 1)]]


def test_samples_of_one_prompt_share_one_prefill(bb):
    prompts = _prompts(bb.tokenizer)
    prefill_rows = []
    hook = bb.decoder.register_forward_pre_hook(lambda m, a, k: prefill_rows.append(k["input_ids"].shape), with_kwargs=True)
    try:
        ro = generate_rollout(bb, prompts, n_samples=3, max_new_tokens=2, seed=4)
    finally:
        hook.remove()
    prefill = _prefill_calls(prefill_rows)
    assert sum(r for r, _w in prefill) == len(prompts) and len(ro) == 3 * len(prompts)  # 4 prefilled rows serve 12
    ids, attn = pad([p.input_ids for p in prompts for _ in range(3)], bb.tokenizer.pad_token_id, side="left")
    assert prefill_tokens(ids, attn) == sum(r * w for r, w in prefill)  # no shared prefix here
    sampled = ro.sample_logp.clone()  # ...and the expanded cache scores like a per-row prefill
    score_rollout(bb, ro, reward_fn=_zero_reward, with_values=False)
    torch.testing.assert_close(ro.logp, sampled, atol=2e-5, rtol=1e-5)


# --- the preallocated cache, the shared-prefix prefill and the C++ draw ---------------------------

def _system_prompts(tok, texts=TEXTS):
    """Chat prompts behind one system turn: a long prefix of real tokens common to every row."""
    out = []
    for t in texts:
        msgs = [{"role": "system", "content": "You are a careful assistant. Answer briefly."},
                {"role": "user", "content": t}]
        rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        out.append(Prompt(t, rendered, tok(rendered, add_special_tokens=False)["input_ids"]))
    return out


@pytest.mark.parametrize("texts", [TEXTS, ("say red", "say tan", "say 123")],
                         ids=["padded-suffixes", "equal-lengths"])  # equal lengths: a mask of all ones
def test_a_common_prefix_is_prefilled_once_with_the_same_result(bb, monkeypatch, texts):
    import rlfuse.engine.sampler as sampler_mod

    tok = bb.tokenizer
    prompts = _system_prompts(tok, texts)
    ids, attn = pad([p.input_ids for p in prompts], tok.pad_token_id, side="left")
    c = sampler_mod.common_prefix_len(ids, attn.long())
    assert c >= 20 and c < int(attn.sum(1).min())  # the system turn, and each row keeps a suffix
    keys = [(3, 0, i, 0) for i in range(len(ids))]
    shared, calls = _sample_recording_calls(bb, ids, attn, max_new_tokens=8, row_keys=keys, temperature=0.9)
    prefill = _prefill_calls(calls)
    assert prefill[0] == (1, c) and sum(r for r, _w in prefill[1:]) == len(ids)  # the prefix once, then the suffixes
    # prefill_tokens (what the benchmarks count as the prefill's work) = what the decoder got
    assert sampler_mod.prefill_tokens(ids, attn) == c + sum(r * w for r, w in prefill[1:])
    monkeypatch.setattr(sampler_mod, "_MIN_SHARED_PREFIX", 10 ** 9)  # the plain prefill: one padded batch
    monkeypatch.setattr(sampler_mod, "_MAX_BUCKETS", 1)
    assert sampler_mod.prefill_tokens(ids, attn) == ids.numel()
    plain = sample(bb, ids, attn, max_new_tokens=8, row_keys=keys, temperature=0.9)
    assert torch.equal(shared.tokens, plain.tokens)
    torch.testing.assert_close(shared.logprobs, plain.logprobs, atol=2e-5, rtol=1e-5)


def test_length_buckets_cover_every_row_once_in_at_most_max_buckets():
    import rlfuse.engine.sampler as sampler_mod

    lengths = torch.tensor([3, 50, 3, 49, 17, 3, 50, 16, 2])
    buckets = sampler_mod.length_buckets(lengths)
    assert 1 < len(buckets) <= sampler_mod._MAX_BUCKETS
    rows = torch.cat([r for r, _w in buckets])
    assert sorted(rows.tolist()) == list(range(len(lengths)))  # every row, once
    for r, width in buckets:
        assert int(lengths[r].max()) == width  # a bucket is as wide as its longest row
    assert [w for _r, w in buckets] == sorted((w for _r, w in buckets), reverse=True)
    assert len(sampler_mod.length_buckets(torch.tensor([7, 7, 7]))) == 1
    assert len(sampler_mod.length_buckets(torch.tensor([20, 21, 22, 23]))) == 1  # too little to save


@pytest.mark.parametrize("system", [False, True], ids=["no-shared-prefix", "shared-prefix"])
def test_prefill_in_length_buckets_gives_the_same_completions(bb, monkeypatch, system):
    """Prompts of very different lengths, prefilled in buckets (the cache assembled from several
    narrow passes, zeros in the columns a bucket never had) or as one padded batch: same tokens,
    same log-probs up to rounding."""
    import rlfuse.engine.sampler as sampler_mod

    tok = bb.tokenizer
    texts = ("hi", "a b", "count the letters of this rather long sentence, one by one, twice over please",
             "ok", "what is two plus two, and then what is that times three")
    prompts = _system_prompts(tok, texts) if system else _prompts(tok, texts)
    ids, attn = pad([p.input_ids for p in prompts], tok.pad_token_id, side="left")
    keys = [(5, 1, i, 0) for i in range(len(ids))]
    monkeypatch.setattr(sampler_mod, "_BUCKET_CALL_COST", 0)
    monkeypatch.setattr(sampler_mod, "_MIN_BUCKET_SAVING", 1.0)
    c = sampler_mod.common_prefix_len(ids, attn.long())
    c = c if c >= sampler_mod._MIN_SHARED_PREFIX else 0  # the chat template's own opening may be shared
    assert (c >= 20) == system and len(sampler_mod.length_buckets(attn.sum(1) - c)) > 1
    bucketed, calls = _sample_recording_calls(bb, ids, attn, max_new_tokens=6, row_keys=keys, temperature=0.8)
    suffix_calls = _prefill_calls(calls)[1 if c else 0:]
    assert len(suffix_calls) > 1 and sampler_mod.prefill_tokens(ids, attn) < ids.numel()
    monkeypatch.setattr(sampler_mod, "_MAX_BUCKETS", 1)
    padded = sample(bb, ids, attn, max_new_tokens=6, row_keys=keys, temperature=0.8)
    assert torch.equal(bucketed.tokens, padded.tokens)
    torch.testing.assert_close(bucketed.logprobs, padded.logprobs, atol=2e-5, rtol=1e-5)


def test_shared_prefix_rollouts_score_as_sampled_and_do_not_depend_on_the_batch(bb):
    prompts = _system_prompts(bb.tokenizer)
    ro = generate_rollout(bb, prompts, n_samples=2, max_new_tokens=6, temperature=0.8, seed=9,
                          prompt_indices=[0, 1, 2, 3])
    sampled = ro.sample_logp.clone()
    score_rollout(bb, ro, temperature=0.8, reward_fn=_zero_reward, with_values=False)
    torch.testing.assert_close(ro.logp, sampled, atol=2e-5, rtol=1e-5)
    alone = generate_rollout(bb, [prompts[1]], n_samples=2, max_new_tokens=6, temperature=0.8, seed=9,
                             prompt_indices=[1])
    assert alone.completions == ro.completions[2:4]


def test_the_cache_is_preallocated_and_compacted_when_rows_leave(bb):
    from rlfuse.engine.sampler import preallocated_cache

    cache = preallocated_cache(bb.base.config, 12)
    k = torch.randn(3, 2, 5, 4)
    keys, _ = cache.layers[0].update(k, k + 1)
    buffer = cache.layers[0]._k
    assert buffer.shape == (3, 2, 12, 4) and torch.equal(keys, k) and cache.get_seq_length() == 5
    step = torch.randn(3, 2, 1, 4)
    keys, values = cache.layers[0].update(step, step)
    assert cache.layers[0]._k is buffer and keys.data_ptr() == buffer.data_ptr()  # written in place
    assert torch.equal(keys[:, :, 5:], step) and torch.equal(values[:, :, :5], k + 1)
    cache.batch_select_indices(torch.tensor([2, 0]))
    assert torch.equal(cache.layers[0].keys, torch.cat([k, step], 2)[[2, 0]]) and cache.get_seq_length() == 6
    with pytest.raises(RuntimeError, match="KV cache capacity 12 exceeded"):
        cache.layers[0].update(torch.randn(2, 2, 7, 4), torch.randn(2, 2, 7, 4))


def test_sampling_without_the_kernel_gives_the_same_completions(bb, monkeypatch):
    import rlfuse.engine.token_pick as token_pick

    if not token_pick.HAS_KERNEL:
        pytest.skip("the C++ extension is not built")
    ids, attn = pad([p.input_ids for p in _prompts(bb.tokenizer)], bb.tokenizer.pad_token_id, side="left")
    keys = [(5, 1, i, 0) for i in range(len(ids))]
    fast = sample(bb, ids, attn, max_new_tokens=8, row_keys=keys, temperature=0.7)
    monkeypatch.setattr(token_pick, "HAS_KERNEL", False)
    slow = sample(bb, ids, attn, max_new_tokens=8, row_keys=keys, temperature=0.7)
    assert torch.equal(fast.tokens, slow.tokens)
    torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_the_kernel_draws_what_the_torch_path_draws(temperature):
    from rlfuse.engine.token_pick import HAS_KERNEL, pick_tokens, pick_tokens_torch

    if not HAS_KERNEL:
        pytest.skip("the C++ extension is not built")
    g = torch.Generator().manual_seed(11)
    z = torch.randn(64, 5003, generator=g) * 4  # a vocabulary that is not a multiple of the lanes
    z[:, 7:900] = float("-inf")  # zero-probability tokens
    z[3] = float("-inf")
    z[3, 4000] = 0.0  # one possible token
    u = torch.rand(64, dtype=torch.float64, generator=g)
    u[0], u[1] = 0.0, 1.0 - 2.0 ** -53
    tokens, logp = pick_tokens(z, u, temperature)
    ref_tokens, ref_logp = pick_tokens_torch(z, u, temperature)
    assert torch.equal(tokens, ref_tokens) and int(tokens[3]) == 4000
    assert not ((tokens >= 7) & (tokens < 900)).any()
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=1e-6)  # torch's float32 log_softmax rounds more
    expected = torch.log_softmax(z.double() / temperature, -1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logp.double(), expected, atol=2e-6, rtol=1e-7)


def test_a_zero_probability_token_is_never_drawn_at_a_cdf_boundary():
    from rlfuse.engine.token_pick import HAS_KERNEL, pick_tokens, pick_tokens_torch

    z = torch.tensor([[0.0, float("-inf"), 0.0], [float("-inf"), 0.0, 0.0]])
    u = torch.tensor([0.5, 0.0], dtype=torch.float64)  # row 0's target sits exactly on the CDF step of token 1
    for pick in ([pick_tokens_torch] + ([pick_tokens] if HAS_KERNEL else [])):
        assert pick(z, u)[0].tolist() == [2, 1]


def test_the_kernel_refuses_non_finite_logits():
    from rlfuse.engine.token_pick import HAS_KERNEL, pick_tokens

    if not HAS_KERNEL:
        pytest.skip("the C++ extension is not built")
    z = torch.zeros(2, 40)
    z[1, 5] = float("nan")
    with pytest.raises(RuntimeError, match="row 1 has non-finite logits"):
        pick_tokens(z, torch.full((2,), 0.5, dtype=torch.float64))
