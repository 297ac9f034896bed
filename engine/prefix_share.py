"""Prefix sharing: the decoder runs each distinct prompt of a rollout batch ONCE.

A rollout batch is ``[B, P + R]``: left-padded prompts of one length P, then R completion
tokens (``rollout.py``). GRPO/RLOO rows come in groups of G samples of one prompt, so a plain
forward computes every prompt G times. Here, with the same math:

    prompt pass      decoder(distinct prompts [U, P], use_cache=True)  -> KV cache, h[:, P-1]
    expand           cache rows -> batch rows (index_select: differentiable, so gradients of
                     the completion pass flow back into the prompt pass)
    completion pass  decoder(completion tokens [B, R-1], that cache, the full mask [B, P+R-1],
                     positions continuing each row's real-token count)

and the hidden states at columns P-1 .. P+R-2 (the ones that predict the completion) are
those of the plain forward up to float rounding. Without a repeated prompt it IS the plain
forward (nothing to share).

Gradient checkpointing: transformers' checkpointed layers drop the KV cache in a training
forward with grad, because a cache that is written would be written again when the backward
replays the layer. The completion pass only READS the prompt's cache, so it runs on a read-only
cache (``_ReadOnlyPrefixLayer``: it returns prompt K/V + the new K/V and stores nothing, so the
replay sees the same states) with the layers told they may keep it under checkpointing
(``_can_checkpoint_with_cache``): the completion pass, nearly all of the tokens, stays
checkpointed. The prompt pass (one row per distinct prompt) writes the cache, so it runs
without checkpointing. ``ppo_update`` also bounds activation memory by micro-batching
(``ppo.micro_batch_size``).
"""

from __future__ import annotations

import contextlib
import functools

import torch


def _positions(mask: torch.Tensor) -> torch.Tensor:
    # the rule of backbone.position_ids_from_mask: positions count real tokens only
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def prompt_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int):
    """(distinct prompt ids [U, P], their mask [U, P], inverse [B]: row -> distinct prompt)."""
    P = prompt_len
    key = torch.cat([input_ids[:, :P], attention_mask[:, :P].to(input_ids.dtype)], 1)
    unique, inverse = torch.unique(key, dim=0, return_inverse=True)
    return unique[:, :P], unique[:, P:].to(attention_mask.dtype), inverse


def _checkpointed_layers(decoder) -> list:
    return [m for m in decoder.modules() if getattr(m, "gradient_checkpointing", False) is True]


@contextlib.contextmanager
def _layer_checkpointing_off(decoder):
    """transformers' GradientCheckpointingLayer flags off for the duration (restored after)."""
    flagged = _checkpointed_layers(decoder)
    for m in flagged:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in flagged:
            m.gradient_checkpointing = True


@contextlib.contextmanager
def _checkpoint_with_cache(decoder):
    """Checkpointed layers keep a (read-only) cache for the duration (restored after)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    flagged = [m for m in _checkpointed_layers(decoder) if isinstance(m, GradientCheckpointingLayer)]
    for m in flagged:
        m._can_checkpoint_with_cache = True  # an instance attribute shadows the class's False
    try:
        yield
    finally:
        for m in flagged:
            del m._can_checkpoint_with_cache


@functools.lru_cache(maxsize=None)  # one class: transformers is imported lazily
def _read_only_layer_class():
    from transformers.cache_utils import DynamicLayer

    class ReadOnlyPrefixLayer(DynamicLayer):
        """The prompt's K/V, never written: ``update`` returns prompt + new states and keeps
        nothing, so a checkpointed layer's backward replay sees exactly what the forward saw."""

        def update(self, key_states, value_states, *args, **kwargs):
            return torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2)

    return ReadOnlyPrefixLayer


def _read_only(cache) -> bool:
    """Swap the cache's full-attention layers for read-only ones; False (nothing swapped) when
    a layer of another kind (sliding window...) would still be written."""
    from transformers.cache_utils import DynamicLayer

    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        return False
    layer_cls = _read_only_layer_class()
    for i, layer in enumerate(cache.layers):
        frozen = layer_cls()
        frozen.__dict__.update(layer.__dict__)
        cache.layers[i] = frozen
    return True


def _last_hidden(out) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def plain_completion_hidden_states(decoder, input_ids, attention_mask, prompt_len: int) -> torch.Tensor:
    """The unshared reference: one forward of every row, hidden states [B, R, H] at P-1 .. P+R-2."""
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=_positions(attention_mask),
                  use_cache=False)
    return _last_hidden(out)[:, prompt_len - 1: -1]


def completion_hidden_states(decoder, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                             prompt_len: int, share: bool | None = None) -> torch.Tensor:
    """Hidden states [B, R, H] at columns P-1 .. P+R-2 of ``input_ids`` [B, P+R] (left-padded
    prompts of length P = ``prompt_len``, then R completion columns), each distinct prompt run
    once. Differentiable (LoRA gradients flow through the shared prompt pass).

    ``share``: None shares when some prompt repeats in THIS batch; True always runs the prompt
    pass + completion pass (also for a batch of distinct prompts), False always the plain
    forward. The two computations agree only up to rounding (in bf16 ~2e-3 in a log-prob, issue
    22), so a PPO step fixes one for the run: a row then scores the same in scoring's batches and
    in any update micro-batch, whichever rows it shares them with."""
    B, T = input_ids.shape
    P = int(prompt_len)
    if not 0 < P < T:
        raise ValueError(f"completion_hidden_states: prompt_len={P} must be in [1, {T - 1}] for {T} columns")
    if share is False:
        return plain_completion_hidden_states(decoder, input_ids, attention_mask, P)
    u_ids, u_mask, inverse = prompt_groups(input_ids, attention_mask, P)
    if u_ids.shape[0] == B and share is None:  # no prompt repeats: nothing to share
        return plain_completion_hidden_states(decoder, input_ids, attention_mask, P)
    from transformers import DynamicCache

    from .sampler import cache_kwarg

    kw = cache_kwarg(decoder)
    with _layer_checkpointing_off(decoder):  # the prompt pass writes the cache: no replay
        cache = DynamicCache(config=decoder.config)
        out = decoder(input_ids=u_ids, attention_mask=u_mask, position_ids=_positions(u_mask), use_cache=True,
                      **{kw: cache})
    first = _last_hidden(out)[:, -1:][inverse]  # column P-1: predicts the first completion token
    del out
    if T - P == 1:  # a one-token completion needs the prompt's last state only
        return first
    cache.batch_select_indices(inverse)  # [U, ...] -> [B, ...] by indexing: gradients reach the prompt pass
    mask = attention_mask[:, :-1]  # the last column's state predicts nothing
    from transformers.modeling_layers import GradientCheckpointingLayer

    checkpointed = [m for m in _checkpointed_layers(decoder) if isinstance(m, GradientCheckpointingLayer)]
    # transformers < 5.2x has no _can_checkpoint_with_cache: its checkpointed layers would drop the cache
    can_keep = checkpointed and all(hasattr(m, "_can_checkpoint_with_cache") for m in checkpointed)
    keep = (_checkpoint_with_cache(decoder) if can_keep and torch.is_grad_enabled() and _read_only(cache)
            else _layer_checkpointing_off(decoder))
    with keep:
        out = decoder(input_ids=input_ids[:, P:-1], attention_mask=mask, position_ids=_positions(mask)[:, P:],
                      use_cache=True, **{kw: cache})
    return torch.cat([first, _last_hidden(out)], 1)
