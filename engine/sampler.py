"""The rollout sampler: a KV-cache decode loop that samples from EXACTLY softmax(logits / T).

Why not ``model.generate``: it applies whatever the checkpoint's ``generation_config`` carries
(repetition_penalty, suppress_tokens, min_p, forced tokens...), even when given a fresh
GenerationConfig, while PPO scores the pure softmax(logits / T). Sampling from anything else
trains off-policy without a warning. This loop never reads the generation_config.

    prefill   one decoder pass over the left-padded prompts (positions count real tokens
              only, like ``position_ids_from_mask``, so sampling and scoring see the same
              positions and the same log-probs); identical rows (the samples of one prompt)
              are prefilled once and share the result, and so is a prefix of real tokens
              common to every prompt (the chat template's system turn); prompts of very
              different lengths go in a few batches of similar length (``length_buckets``)
              rather than one padded to the longest
    decode    one token per step through a preallocated KV cache (written in place, no
              per-step concatenation); the LM head runs on the last hidden state only; rows
              that produced an EOS leave the batch and the cache, so a finished row costs
              nothing more; the loop ends when every row has finished

Reproducible: each row draws its randomness from its own key (seed, iteration, prompt index,
sample index): one uniform per step from a generator seeded by a hash of the key, turned into
a token by inverse-CDF sampling (float64 cumulative sum of the probabilities; ``token_pick``:
a C++ row kernel on CPU, the same draw in torch elsewhere). A
completion therefore does not depend on batch size, batch composition, padding or the number
of processes (up to float rounding of the logits themselves).

Compiled: ``compile=True`` runs the decode step through ``torch.compile`` (mode
"reduce-overhead", i.e. CUDA graphs, on a GPU), falling back to eager with a warning if
compilation fails. Finished rows are still dropped: the batch shrinks, so the step is marked
dynamic in its batch and cache length (no recompilation per step).
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import inspect
import warnings
from dataclasses import dataclass

import torch

from .token_pick import pick_tokens


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # [B, R] completion tokens, pad_id after a row's first EOS
    logprobs: torch.Tensor  # [B, R] float32 log-prob of each sampled token under softmax(z / T), 0 after EOS
    finished: torch.Tensor  # [B] bool: the row produced an EOS within max_new_tokens
    forward_rows: int  # rows pushed through decode steps (prefill excluded): what finished rows save


def key_seed(key) -> int:
    """A 63-bit generator seed from a tuple of ints, stable across processes and machines
    (Python's ``hash`` is not guaranteed to be)."""
    ints = tuple(int(k) for k in key)
    digest = hashlib.blake2b(repr(ints).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def row_uniforms(row_keys, n_steps: int, device) -> torch.Tensor:
    """[B, n_steps] float64 uniforms in [0, 1): row i's come from its key only."""
    out = torch.empty(len(row_keys), n_steps, dtype=torch.float64)
    for i, key in enumerate(row_keys):
        g = torch.Generator().manual_seed(key_seed(key))
        out[i] = torch.rand(n_steps, dtype=torch.float64, generator=g)
    return out.to(device)


def final_logits(hidden: torch.Tensor, lm_head, config, temperature: float) -> torch.Tensor:
    """float32 logits / T of the last hidden states, with the model's own final-logit scale
    and softcap (z * logit_scale, then softcap * tanh(z / softcap)) read exactly as scoring reads
    them (``lm_head_logit_options``: Gemma's softcap, Cohere's scale, Granite's divisor)."""
    from .lm_head_options import lm_head_logit_options

    opts = lm_head_logit_options(config)
    z = lm_head(hidden).float()
    if opts["logit_scale"] is not None:
        z = z * opts["logit_scale"]
    if opts["softcap"] is not None:
        z = opts["softcap"] * torch.tanh(z / opts["softcap"])
    return z if temperature == 1.0 else z / temperature  # z / 1 would be a [B, V] copy for nothing


def check_request(input_ids, attention_mask, *, max_new_tokens: int, temperature: float, greedy: bool,
                  top_k, top_p, max_positions: int | None, row_keys) -> None:
    """Clear one-line errors for requests the sampler cannot serve exactly."""
    if top_k not in (None, 0) or top_p not in (None, 1.0):
        raise ValueError(f"sampler: top_k={top_k} / top_p={top_p} are not supported: PPO scores the full "
                         "softmax(logits / T), so truncated sampling would be off-policy")
    if not greedy and not temperature > 0:
        raise ValueError(f"sampler: temperature must be > 0, got {temperature}")
    if int(max_new_tokens) < 1:
        raise ValueError(f"sampler: max_new_tokens must be >= 1, got {max_new_tokens}")
    if input_ids.ndim != 2 or input_ids.shape[0] == 0:
        raise ValueError(f"sampler: empty prompt list (input_ids shape {tuple(input_ids.shape)})")
    lengths = attention_mask.sum(1)
    if (lengths == 0).any():
        raise ValueError(f"sampler: prompt {int((lengths == 0).nonzero()[0])} is empty (no unmasked token)")
    not_left_padded = _rows_not_left_padded(attention_mask)
    if not_left_padded.any():
        bad = int(not_left_padded.nonzero()[0])
        raise ValueError(f"sampler: prompt {bad} is not left-padded (its attention_mask must read 0...0 1...1: "
                         "each row's next token follows its last column; tokenizer.padding_side = \"left\")")
    longest = int(lengths.max())
    if max_positions is not None and longest + max_new_tokens > max_positions:
        raise ValueError(f"sampler: a prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the "
                         f"model's context (max_position_embeddings={max_positions})")
    if row_keys is not None and len(row_keys) != input_ids.shape[0]:
        raise ValueError(f"sampler: {len(row_keys)} row_keys for {input_ids.shape[0]} rows")


def cache_kwarg(decoder) -> str:
    """transformers >= 5.2x names the KV cache argument ``cache`` (``past_key_values`` is deprecated)."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


@functools.lru_cache(maxsize=None)  # one class: transformers is imported lazily
def _preallocated_layer_class():
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A full-attention KV layer with its [rows, heads, capacity, dim] buffers allocated once
        (at the prefill) and written in place each step: ``keys``/``values`` are views of the
        filled columns. A DynamicLayer otherwise (mask sizes, seq length), so the model builds
        the same masks as with the growing cache; no per-step concatenation."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity, self.length = int(capacity), 0
            self._k = self._v = None

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = key_states.shape[-2]
            if self._k is None:
                b, h, _, d = key_states.shape
                self._k = key_states.new_empty(b, h, self.capacity, d)
                self._v = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
            end = self.length + n
            if end > self.capacity:
                raise RuntimeError(f"sampler: KV cache capacity {self.capacity} exceeded ({end} columns)")
            self._k[:, :, self.length:end].copy_(key_states)
            self._v[:, :, self.length:end].copy_(value_states)
            self.length = end
            self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            # rows leave (or a shared prefill expands): one index_select of the buffers, rare
            if self._k is not None:
                self._k, self._v = self._k.index_select(0, indices), self._v.index_select(0, indices)
                self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

    return PreallocatedLayer


def preallocated_cache(config, capacity: int):
    """A transformers DynamicCache whose full-attention layers are preallocated for ``capacity``
    columns (prompt + new tokens); other layer kinds (sliding window, linear attention) keep
    their own implementation."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=config)
    layer_cls = _preallocated_layer_class()
    cache.layers = [layer_cls(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


class _DecodeStep:
    """decoder + LM head on one new token per row; eager, or compiled with an eager fallback."""

    def __init__(self, decoder, lm_head, config, temperature: float, compile: bool | str):
        self.decoder, self.lm_head, self.config, self.temperature = decoder, lm_head, config, temperature
        self.cache_kwarg = cache_kwarg(decoder)
        self.compiled = None
        if compile:  # True: inductor; a string names another torch.compile backend (tests: "aot_eager")
            backend = compile if isinstance(compile, str) else "inductor"
            mode = "reduce-overhead" if backend == "inductor" and next(decoder.parameters()).is_cuda else None
            try:
                self.compiled = torch.compile(self._eager, dynamic=True, backend=backend, mode=mode)
            except Exception as exc:  # e.g. an unknown backend
                self._fall_back(exc)

    def _fall_back(self, exc: Exception) -> None:
        warnings.warn(f"sampler: torch.compile of the decode step failed ({type(exc).__name__}: "
                      f"{(str(exc).splitlines() or [''])[0][:200]}); decoding eagerly", stacklevel=3)
        self.compiled = None

    def _eager(self, ids, attention_mask, position_ids, cache):
        out = self.decoder(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=True, **{self.cache_kwarg: cache})
        return final_logits(out.last_hidden_state[:, -1], self.lm_head, self.config, self.temperature)

    def __call__(self, ids, attention_mask, position_ids, cache):
        if self.compiled is not None:
            try:
                return self.compiled(ids, attention_mask, position_ids, cache)
            except Exception as exc:  # a backend without a compiler, an unsupported op...
                self._fall_back(exc)
        return self._eager(ids, attention_mask, position_ids, cache)


def _rows_not_left_padded(mask: torch.Tensor) -> torch.Tensor:
    """[B] bool: the row's mask is not 0...0 1...1 (right padding, a hole)."""
    return (mask[:, 1:] < mask[:, :-1]).any(1)


def common_prefix_len(ids: torch.Tensor, mask: torch.Tensor) -> int:
    """Length of the longest run of real tokens that starts every row of left-padded ``ids``
    (0 unless every mask row is 0...0 1...1), capped so each row keeps >= 1 token after it."""
    if ids.shape[0] < 2 or bool(_rows_not_left_padded(mask).any()):
        return 0
    lengths = mask.sum(1)
    shortest, P = int(lengths.min()), ids.shape[1]
    cols = (P - lengths).unsqueeze(1) + torch.arange(shortest - 1, device=ids.device)  # the first real tokens
    same = (ids.gather(1, cols) == ids[:1].gather(1, cols[:1])).all(0)
    return int(same.long().cumprod(0).sum())


def _prefill(decoder, lm_head, config, text_config, input_ids, mask, max_new_tokens: int):
    """(cache, logits [B, V] of each row's next token, the cache's column mask [B, P']).

    The whole prompt goes through the decoder once, the LM head on its last position only.
    Rows that repeat a prompt (GRPO's G samples of one prompt) are prefilled ONCE, then the
    cache is expanded to every row. A prefix of real tokens common to every prompt (the chat
    template's system turn) is computed once too: its keys/values at positions 0..c-1 are the
    same for every row (causal attention), so the cache holds [prefix c | left-padded suffixes
    | new tokens] and each row's suffix attends to the shared prefix, the same keys and
    positions as a plain prefill (up to float rounding of the smaller matmuls). Suffixes of very
    different lengths are prefilled in buckets and their keys/values assembled into one cache."""
    kw = cache_kwarg(decoder)
    u_ids, u_mask, inverse, c = _prefill_plan(input_ids, mask)
    U, lengths = u_ids.shape[0], u_mask.sum(1)
    S = int(lengths.max()) - c  # the widest suffix (the whole prompt when nothing is shared)
    cache = preallocated_cache(config, c + S + max_new_tokens)
    buckets = length_buckets(lengths - c)
    if len(buckets) > 1 and any(type(layer) is not _preallocated_layer_class() for layer in cache.layers):
        buckets = [(torch.arange(U, device=u_ids.device), S)]  # sliding-window layers...: one padded batch
    prefix_cache = None
    if c:  # one bucket: straight into the cache, expanded below; several: a cache of its own
        prefix_cache = cache if len(buckets) == 1 else preallocated_cache(config, c)
        start = input_ids.shape[1] - int(lengths[0])
        prefix = u_ids[:1, start:start + c]
        decoder(input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True,
                position_ids=torch.arange(c, device=prefix.device).unsqueeze(0), **{kw: prefix_cache})
    if len(buckets) == 1:
        if c:
            cache.batch_select_indices(torch.zeros(U, dtype=torch.long, device=u_ids.device))
        out = _suffix_pass(decoder, kw, cache, u_ids, lengths, c, S)
        z = final_logits(out.last_hidden_state[:, -1], lm_head, text_config, 1.0)  # / T inside pick_tokens
        del out  # the prompt's hidden states: only the cache is needed from here
    else:
        z = _bucketed_prefill(decoder, lm_head, config, text_config, kw, cache, prefix_cache, u_ids, lengths,
                              c, S, buckets)
    u_mask = _window_mask(lengths, c, S)
    if inverse is not None:
        cache.batch_select_indices(inverse)
        z, u_mask = z[inverse], u_mask[inverse]
    return cache, z, u_mask


def _window_mask(lengths: torch.Tensor, c: int, width: int) -> torch.Tensor:
    """[rows, c + width] column mask: the shared prefix, then each row's suffix right-aligned."""
    suffix = (torch.arange(width, device=lengths.device) >= (width - (lengths - c)).unsqueeze(1)).long()
    return torch.cat([suffix.new_ones(len(lengths), c), suffix], 1)


def _suffix_pass(decoder, kw: str, cache, ids: torch.Tensor, lengths: torch.Tensor, c: int, width: int):
    """The decoder over the last ``width`` columns of left-padded ``ids`` (each row's tokens after
    the shared prefix, right-aligned), on a cache that already holds the prefix's c columns."""
    m = _window_mask(lengths, c, width)
    return decoder(input_ids=ids[:, ids.shape[1] - width:], attention_mask=m, use_cache=True,
                   position_ids=(m.cumsum(-1) - 1).clamp(min=0)[:, c:], **{kw: cache})


def _bucketed_prefill(decoder, lm_head, config, text_config, kw, cache, prefix_cache, ids, lengths, c, S,
                      buckets):
    """Prefill each bucket of similar-length rows as its own narrow batch, then write every
    layer's keys/values into ``cache`` as one [rows, heads, c + S, dim] block: the prefix, zeros
    in the columns a narrower bucket never had (masked: never attended), each row's window
    right-aligned. Returns the rows' next-token logits."""
    U = ids.shape[0]
    z, per_bucket = None, []
    for rows, width in buckets:
        bcache = preallocated_cache(config, c + width)
        if prefix_cache is not None:  # the shared prefix's keys/values, one copy per row
            for layer, pre in zip(bcache.layers, prefix_cache.layers):
                layer.update(pre.keys.expand(len(rows), -1, -1, -1), pre.values.expand(len(rows), -1, -1, -1))
        out = _suffix_pass(decoder, kw, bcache, ids[rows], lengths[rows], c, width)
        zb = final_logits(out.last_hidden_state[:, -1], lm_head, text_config, 1.0)
        del out
        if z is None:
            z = zb.new_empty(U, zb.shape[-1])
        z[rows] = zb
        per_bucket.append((rows, width, bcache))
    for i, layer in enumerate(cache.layers):
        k0, v0 = per_bucket[0][2].layers[i].keys, per_bucket[0][2].layers[i].values
        k = k0.new_zeros(U, k0.shape[1], c + S, k0.shape[-1])
        v = v0.new_zeros(U, v0.shape[1], c + S, v0.shape[-1])
        for rows, width, bcache in per_bucket:
            bk, bv = bcache.layers[i].keys, bcache.layers[i].values
            k[rows, :, :c], v[rows, :, :c] = bk[:, :, :c], bv[:, :, :c]
            k[rows, :, c + S - width:], v[rows, :, c + S - width:] = bk[:, :, c:], bv[:, :, c:]
        layer.update(k, v)
        for _rows, _width, bcache in per_bucket:  # free as we go: one layer's copy at a time
            bcache.layers[i] = None
    return z


_MIN_SHARED_PREFIX = 4  # tokens: below this a separate prefix pass saves less than it costs


def _prefill_plan(input_ids: torch.Tensor, mask: torch.Tensor):
    """(distinct rows' ids, their mask, the inverse index to every row or None when all rows
    differ, the length of the real-token prefix they share or 0 when too short to pay)."""
    P = input_ids.shape[1]
    unique, inverse = torch.unique(torch.cat([input_ids, mask], 1), dim=0, return_inverse=True)
    if unique.shape[0] < input_ids.shape[0]:
        u_ids, u_mask = unique[:, :P], unique[:, P:]
    else:
        u_ids, u_mask, inverse = input_ids, mask, None
    c = common_prefix_len(u_ids, u_mask)
    return u_ids, u_mask, inverse, (c if c >= _MIN_SHARED_PREFIX else 0)


_MAX_BUCKETS = 4  # prefill calls per sampling call, at most
_BUCKET_CALL_COST = 64  # token positions charged per extra prefill call (its fixed cost)
_MIN_BUCKET_SAVING = 0.9  # split only when it leaves <= 90% of one padded batch's cost
_MAX_DP_LENGTHS = 64  # candidate group boundaries the bucketing considers, at most


def length_buckets(suffix_lengths: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """Split rows into <= _MAX_BUCKETS groups of similar length, each prefilled as its own
    left-padded batch: [(row indices, the group's width)], widest first. Chosen to minimise the
    padded positions (rows x width, summed over groups) plus _BUCKET_CALL_COST per extra call, by
    dynamic programming over the distinct lengths; one group when splitting does not pay."""
    lengths = suffix_lengths.tolist()
    distinct = sorted(set(lengths))
    if len(distinct) > _MAX_DP_LENGTHS:  # group boundaries only at quantiles: the DP stays O(64^2)
        step = len(distinct) / _MAX_DP_LENGTHS
        distinct = sorted({distinct[int((i + 1) * step) - 1] for i in range(_MAX_DP_LENGTHS)} | {distinct[-1]})
    count = {n: 0 for n in distinct}
    for n in lengths:
        count[distinct[bisect.bisect_left(distinct, n)]] += 1  # the smallest boundary >= n
    D = len(distinct)
    rows_upto = [0] * (D + 1)  # rows_upto[j]: rows with length among the first j distinct lengths
    for j, n in enumerate(distinct):
        rows_upto[j + 1] = rows_upto[j] + count[n]
    inf = float("inf")
    # best[k][j]: least cost of the first j distinct lengths in k groups; a group (i, j] has width distinct[j-1]
    best = [[inf] * (D + 1) for _ in range(_MAX_BUCKETS + 1)]
    cut = [[0] * (D + 1) for _ in range(_MAX_BUCKETS + 1)]
    best[0][0] = 0.0
    for k in range(1, _MAX_BUCKETS + 1):
        for j in range(1, D + 1):
            for i in range(k - 1, j):
                cost = best[k - 1][i] + (rows_upto[j] - rows_upto[i]) * distinct[j - 1] + _BUCKET_CALL_COST
                if cost < best[k][j]:
                    best[k][j], cut[k][j] = cost, i
    k = min(range(1, _MAX_BUCKETS + 1), key=lambda kk: best[kk][D])
    if best[k][D] > _MIN_BUCKET_SAVING * best[1][D]:
        k = 1  # splitting saves too little to be worth the extra calls
    bounds, j = [], D
    while k > 0:
        i = cut[k][j]
        bounds.append((distinct[i - 1] if i > 0 else -1, distinct[j - 1]))  # lengths in (lo, hi]
        j, k = i, k - 1
    out = []
    for lo, hi in bounds:  # widest first
        rows = ((suffix_lengths > lo) & (suffix_lengths <= hi)).nonzero().squeeze(-1)
        out.append((rows, hi))
    return out


def prefill_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """Token positions the sampler's prefill pushes through the decoder for these left-padded
    prompts (padding included): each distinct prompt once, a shared prefix once, rows in groups of
    similar length (models whose layers all use full attention; others prefill one padded batch).
    ``generate`` pushes every row's every column."""
    u_ids, u_mask, _inverse, c = _prefill_plan(input_ids, attention_mask.long())
    suffix = u_mask.sum(1) - c
    return c + sum(len(rows) * width for rows, width in length_buckets(suffix))


@torch.no_grad()
def sample_tokens(decoder, lm_head, config, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                  max_new_tokens: int, eos_token_ids, pad_token_id: int, temperature: float = 1.0,
                  greedy: bool = False, row_keys=None, top_k=None, top_p=None,
                  compile: bool | str = False, on_token=None) -> SampleOutput:
    """Sample completions of left-padded prompts with ``decoder`` (a HF decoder with its adapters
    as they are: set the active adapter before calling) and ``lm_head``. ``row_keys``: one tuple
    of ints per row, the only source of that row's randomness (required unless ``greedy``).
    ``on_token(rows, tokens)``: called after every step with the rows still decoding and the
    token each just drew (to stream text, e.g. ``rlfuse chat``)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    check_request(input_ids, attention_mask, max_new_tokens=max_new_tokens, temperature=temperature,
                  greedy=greedy, top_k=top_k, top_p=top_p, row_keys=row_keys,
                  max_positions=getattr(text_config, "max_position_embeddings", None))
    if not greedy and row_keys is None:
        raise ValueError("sampler: row_keys are required for sampling (one tuple of ints per row)")
    B, device = input_ids.shape[0], input_ids.device
    temperature = 1.0 if greedy else float(temperature)
    uniforms = None if greedy else row_uniforms(row_keys, max_new_tokens, device)
    eos = torch.tensor(sorted(set(eos_token_ids)), device=device, dtype=torch.long)
    tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)

    mask = attention_mask.long()
    cache, z, mask = _prefill(decoder, lm_head, config, text_config, input_ids, mask, max_new_tokens)
    next_pos = mask.sum(1, keepdim=True)  # the position of each row's next token
    active = torch.arange(B, device=device)  # original row of each row still decoding
    step_fn = _DecodeStep(decoder, lm_head, text_config, 1.0, compile)
    # the mask of every column the loop will reach, sliced per step (no per-step concatenation)
    P = mask.shape[1]  # the prefill's columns (<= the prompts' when a common prefix was shared)
    mask = torch.cat([mask, mask.new_ones(B, max_new_tokens)], 1)
    forward_rows, n_steps = 0, 0
    for t in range(max_new_tokens):
        n_steps = t + 1
        tok, lp = pick_tokens(z, None if greedy else uniforms[active, t], temperature)
        tokens[active, t], logprobs[active, t] = tok, lp
        if on_token is not None:
            on_token(active, tok)
        done = torch.isin(tok, eos)
        if done.any():
            finished[active[done]] = True
            if bool(done.all()):
                break
            keep = (~done).nonzero().squeeze(-1)
            # drop finished rows from the batch AND the cache: they stop costing compute
            cache.batch_select_indices(keep)
            active, tok, mask, next_pos = active[keep], tok[keep], mask[keep], next_pos[keep]
        if t == max_new_tokens - 1:
            break
        z = step_fn(tok.unsqueeze(-1), mask[:, :P + t + 1], next_pos, cache)
        next_pos = next_pos + 1
        forward_rows += tok.shape[0]
    return SampleOutput(tokens[:, :n_steps], logprobs[:, :n_steps], finished, forward_rows)


def sample(backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
           temperature: float = 1.0, adapter: str | None = "policy", greedy: bool = False, row_keys=None,
           top_k=None, top_p=None, compile: bool | str | None = None, on_token=None) -> SampleOutput:
    """:func:`sample_tokens` with one adapter of a :class:`~rlfuse.engine.backbone.Backbone`
    active (None: the bare base model), in eval mode (no LoRA dropout). ``compile=None``: the
    backbone's ``compile_sampler`` setting."""
    if compile is None:
        compile = getattr(backbone, "compile_sampler", False)
    model = backbone.model
    was_training = model.training
    model.eval()
    try:
        with backbone.use(adapter):
            return sample_tokens(backbone.decoder, backbone.lm_head, backbone.base.config, input_ids,
                                 attention_mask, max_new_tokens=max_new_tokens,
                                 eos_token_ids=backbone.eos_token_ids(), pad_token_id=backbone.tokenizer.pad_token_id,
                                 temperature=temperature, greedy=greedy, row_keys=row_keys, top_k=top_k,
                                 top_p=top_p, compile=compile, on_token=on_token)
    finally:
        model.train(was_training)
