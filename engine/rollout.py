"""Rollouts: sample completions with the policy (``sample_completions`` -> ``Sampled``), then
score them (``score`` -> ``Scored``); the values are in ``step_values.py``.

Layout of a rollout batch (P = longest prompt, R = longest completion):

    input_ids  [B, P + R]   left-padded prompt | completion, right-padded after its EOS
    response_mask [B, R]    1 on completion tokens (up to and including the first EOS)

Since every completion starts at column P, hidden[:, P-1 : P+R-1] is exactly the set of
states that predicted completion tokens: log-probs, entropies and values all live on this
[B, R] grid (``backbone.completion_hidden_states``: the samples of one prompt share one
pass over it, see ``prefix_share.py``). Scoring is one no-grad forward per role:

    policy    ("policy" adapter)        -> log-probs, entropy, values (value head), one pass
    reference (``sft`` or bare base)    -> log-probs
    reward    ("reward" adapter + head) -> one score per sequence, or a Python reward_fn;
              the reward model reads each sequence in ITS training layout (``reward_layout``:
              prompt + completion + EOS, read at the EOS), the same as ``data.reward_ids``
"""

from __future__ import annotations

import importlib
import importlib.util
import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .backbone import POLICY, VALUE
from .data import Prompt, end_of_turn_id, pad
from .step_values import Sampled, Scored

RewardFn = Callable[[list[str], list[str]], list[float]]


@dataclass
class Rollout:
    """The mutable record of scripts and tests: ``generate_rollout`` makes it, ``score_rollout``
    fills it in place. The PPO step itself passes frozen values (``step_values.py``); the fields
    and their meanings are theirs."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    response_mask: torch.Tensor  # [B, R] float
    prompts: list[str]  # the raw prompts (what a reward_fn sees)
    completions: list[str]
    logp: torch.Tensor | None = None  # [B, R] policy log-probs at sampling time ("old")
    ref_logp: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    values: torch.Tensor | None = None
    scores: torch.Tensor | None = None  # [B] sequence-level reward
    truncated: torch.Tensor | None = None  # [B] bool: no EOS within max_new_tokens (cut, not finished)
    sample_logp: torch.Tensor | None = None  # [B, R] the sampler's own log-probs (== logp up to rounding)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def labels(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_len:]

    @classmethod
    def of(cls, value) -> "Rollout":
        """A mutable copy of a step value's fields (``Sampled`` or ``Scored``)."""
        return cls(**{f.name: getattr(value, f.name, None) for f in dataclasses.fields(cls)})


def sample_completions(backbone, prompts: list[Prompt], *, n_samples: int = 1, max_new_tokens: int = 32,
                       temperature: float = 1.0, seed: int = 0, iteration: int = 0,
                       prompt_indices=None, sampling_round: int = 0, greedy: bool = False) -> Sampled:
    """Sample ``n_samples`` completions per prompt; rows of one prompt are adjacent (groups).

    Sample j of prompt i draws its randomness from the key (seed, iteration, prompt_indices[i], j)
    only, so it is the same whatever batch, shard or process it lands in: pass GLOBAL dataset
    indices as ``prompt_indices`` (default: 0..len(prompts)-1). ``sampling_round`` > 0 (dynamic
    sampling's refills) extends the key, so a prompt drawn again in the same iteration gets
    fresh samples. ``greedy``: argmax completions instead (evaluation: no randomness, no keys)."""
    from .sampler import sample

    tok = backbone.tokenizer
    if prompt_indices is None:
        prompt_indices = range(len(prompts))
    prompt_indices = [int(i) for i in prompt_indices]
    if len(prompt_indices) != len(prompts):
        raise ValueError(f"generate_rollout: {len(prompt_indices)} prompt_indices for {len(prompts)} prompts")
    if not prompts:
        raise ValueError("generate_rollout: empty prompt list")
    rows = [p for p in prompts for _ in range(n_samples)]
    keys = [(seed, iteration, i, j) + ((sampling_round,) if sampling_round else ())
            for i in prompt_indices for j in range(n_samples)]
    ids, attn = pad([p.input_ids for p in rows], tok.pad_token_id, side="left", device=backbone.device)
    out = sample(backbone, ids, attn, max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy,
                 row_keys=None if greedy else keys)
    P = ids.shape[1]
    completion = out.tokens
    is_eos = torch.isin(completion, torch.tensor(backbone.eos_token_ids(), device=completion.device))
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    completion = completion.masked_fill(after_eos, tok.pad_token_id)
    response_mask = (~after_eos).long()
    texts = tok.batch_decode([c[m.bool()] for c, m in zip(completion, response_mask)], skip_special_tokens=True)
    return Sampled(input_ids=torch.cat([ids, completion], 1), attention_mask=torch.cat([attn, response_mask], 1),
                   prompt_len=P, response_mask=response_mask.float(), prompts=[p.raw for p in rows],
                   completions=texts, truncated=~out.finished, sample_logp=out.logprobs * response_mask)


def generate_rollout(backbone, prompts: list[Prompt], **kwargs) -> Rollout:
    """``sample_completions`` as a mutable ``Rollout`` (for ``score_rollout``; same arguments)."""
    return Rollout.of(sample_completions(backbone, prompts, **kwargs))


_ROW_FIELDS = ("logp", "ref_logp", "entropy", "values", "sample_logp")  # [B, R], 0 past a row's tokens
_ROW_VALUES = ("scores", "truncated")  # [B]


def _row_fields(record) -> list[str]:
    """The per-row fields ``record``'s type has (a ``Sampled`` has no scores, a ``Scored`` has them all)."""
    names = {f.name for f in dataclasses.fields(record)}
    return [f for f in _ROW_FIELDS + _ROW_VALUES if f in names]


def select_rows(ro, rows: list[int]):
    """The record (``Rollout`` or a step value, same type) of rows ``rows`` only; ``ro`` is left as it is."""
    idx = torch.as_tensor(rows, dtype=torch.long, device=ro.input_ids.device)
    pick = lambda t: None if t is None else torch.as_tensor(t)[idx]  # noqa: E731
    return dataclasses.replace(ro, input_ids=ro.input_ids[idx], attention_mask=ro.attention_mask[idx],
                               response_mask=ro.response_mask[idx], prompts=[ro.prompts[i] for i in rows],
                               completions=[ro.completions[i] for i in rows],
                               **{f: pick(getattr(ro, f)) for f in _row_fields(ro)})


def concat_rollouts(parts: list, pad_id: int):
    """One record of several (all of one type), in order: prompts re-padded on the left to the
    longest prompt, completions (and every [B, R] field) on the right to the longest completion,
    so the layout holds (every completion starts at column P)."""
    if len(parts) == 1:
        return parts[0]
    P = max(r.prompt_len for r in parts)
    R = max(r.response_mask.shape[1] for r in parts)

    def grid(t, width, value, left=False):
        pad = width - t.shape[1]
        return torch.nn.functional.pad(t, (pad, 0) if left else (0, pad), value=value)

    ids = torch.cat([torch.cat([grid(r.input_ids[:, :r.prompt_len], P, pad_id, left=True),
                                grid(r.input_ids[:, r.prompt_len:], R, pad_id)], 1) for r in parts])
    attn = torch.cat([torch.cat([grid(r.attention_mask[:, :r.prompt_len], P, 0, left=True),
                                 grid(r.attention_mask[:, r.prompt_len:], R, 0)], 1) for r in parts])
    fields = {}
    for f in (f for f in _ROW_FIELDS if f in _row_fields(parts[0])):
        have = [getattr(r, f) is not None for r in parts]
        if any(have) and not all(have):
            raise ValueError(f"concat_rollouts: {f} is scored in some parts and not in others")
        fields[f] = torch.cat([grid(getattr(r, f), R, 0.0) for r in parts]) if all(have) else None
    for f in (f for f in _ROW_VALUES if f in _row_fields(parts[0])):
        fields[f] = (torch.cat([torch.as_tensor(getattr(r, f)) for r in parts])
                     if all(getattr(r, f) is not None for r in parts) else None)
    return dataclasses.replace(parts[0], input_ids=ids, attention_mask=attn, prompt_len=P,
                               response_mask=torch.cat([grid(r.response_mask, R, 0.0) for r in parts]),
                               prompts=[p for r in parts for p in r.prompts],
                               completions=[c for r in parts for c in r.completions], **fields)


def policy_outputs(backbone, input_ids, attention_mask, prompt_len: int, *, temperature: float,
                   with_values: bool):
    """ONE forward of the active adapter -> (logp, entropy, values or None), each [B, R]; each
    distinct prompt is run once (``prefix_share.py``)."""
    hidden = backbone.completion_hidden_states(input_ids, attention_mask, prompt_len)
    logp, entropy = backbone.token_logprobs(hidden, input_ids[:, prompt_len:], temperature=temperature,
                                            entropy=True)
    values = backbone.value_head(hidden) if with_values else None
    return logp, entropy, values


def critic_values(backbone, input_ids, attention_mask, prompt_len: int) -> torch.Tensor:
    """Values [B, R] from the ``value`` adapter's own forward (ppo.critic=adapter)."""
    with backbone.use(VALUE):
        hidden = backbone.completion_hidden_states(input_ids, attention_mask, prompt_len)
    return backbone.value_head(hidden)


VALUE_SOURCES = (None, "policy", "adapter")  # no critic | value head on the policy's pass | the value adapter's


@torch.no_grad()
def score(backbone, sampled, *, temperature: float = 1.0, reward_fn: RewardFn | None = None,
          values: str | None = "policy", batch_size: int = 32, with_policy: bool = True) -> Scored:
    """The ``Scored`` value of ``sampled``: reference log-probs, raw scores and, with ``with_policy``,
    the old log-probs and entropies; ``values`` from the value head on the policy's pass
    ("policy"), on the value adapter's own pass ("adapter"), or none (None).

    ``with_policy=False`` skips the policy pass (logp / entropy None; values need "adapter" or
    None): with ONE optimisation pass over ONE minibatch, the update's own forward gives the
    old log-probs (``update_plan.reuses_forward``), as TRL does."""
    if values not in VALUE_SOURCES:
        raise ValueError(f"score: values must be one of {VALUE_SOURCES}, got {values!r}")
    if values == "policy" and not with_policy:
        raise ValueError("score: values from the policy's pass need with_policy=True")
    was_training = backbone.model.training
    backbone.train(False)
    P, mask = sampled.prompt_len, sampled.response_mask
    logps, refs, ents, vals, scores = [], [], [], [], []
    for i in range(0, len(sampled), batch_size):
        ids, attn = sampled.input_ids[i: i + batch_size], sampled.attention_mask[i: i + batch_size]
        if with_policy:
            with backbone.use(POLICY):
                logp, ent, val = policy_outputs(backbone, ids, attn, P, temperature=temperature,
                                                with_values=values == "policy")
            logps.append(logp), ents.append(ent)
            if val is not None:
                vals.append(val)
        if values == "adapter":
            vals.append(critic_values(backbone, ids, attn, P))
        with backbone.use(backbone.reference_adapter):
            ref = backbone.token_logprobs(backbone.completion_hidden_states(ids, attn, P), ids[:, P:],
                                          temperature=temperature)
        refs.append(ref)
        if reward_fn is None:
            r_ids, r_attn = reward_layout(ids, attn, mask[i: i + batch_size], P, backbone.eos_token_ids(),
                                          end_of_turn_id(backbone.tokenizer), backbone.tokenizer.pad_token_id)
            scores.append(backbone.reward_scores(r_ids, r_attn).float())
    backbone.train(was_training)

    logp, entropy = (torch.cat(x) * mask if x else None for x in (logps, ents))
    base = {f.name: getattr(sampled, f.name) for f in dataclasses.fields(Sampled)}
    return Scored(**base, ref_logp=torch.cat(refs) * mask, logp=logp, entropy=entropy,
                  values=torch.cat(vals) * mask if vals else None,
                  scores=torch.cat(scores) if reward_fn is None else call_reward_fn(reward_fn, sampled,
                                                                                     device=mask.device))


def score_rollout(backbone, ro: Rollout, *, temperature: float = 1.0, reward_fn: RewardFn | None = None,
                  with_values: bool = True, batch_size: int = 32, with_policy: bool = True) -> Rollout:
    """``score`` for a mutable ``Rollout``: fills ``ro`` in place (old log-probs, entropy, values
    from the policy's pass, reference log-probs, scores) and returns it."""
    scored = score(backbone, ro, temperature=temperature, reward_fn=reward_fn,
                   values="policy" if with_values and with_policy else None, batch_size=batch_size,
                   with_policy=with_policy)
    for name in ("logp", "ref_logp", "entropy", "values", "scores"):
        setattr(ro, name, getattr(scored, name))
    return ro


def reward_layout(input_ids, attention_mask, response_mask, prompt_len: int, eos_ids: list[int],
                  end_of_turn: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A rollout batch in the reward model's layout (``data.reward_ids``): prompt + the
    completion's tokens before its first EOS + ``end_of_turn``, the last real token. A
    completion cut at max_new_tokens gets the EOS appended (one extra column), one that
    stopped on another EOS id has it replaced, so the reward model reads every answer
    exactly as it was trained to, never mid-answer nor on a token training never ended on."""
    P = prompt_len
    completion = input_ids[:, P:]
    is_eos = torch.isin(completion, torch.tensor(eos_ids, device=completion.device))
    n_tok = (response_mask.bool() & ~is_eos).long().sum(1)  # tokens before the first EOS
    B, R = completion.shape
    cols = torch.arange(R + 1, device=input_ids.device).expand(B, R + 1)
    new = torch.cat([completion, completion.new_full((B, 1), pad_id)], 1)
    keep = cols < n_tok[:, None]
    new = torch.where(keep, new, torch.full_like(new, pad_id))
    new = torch.where(cols == n_tok[:, None], torch.full_like(new, end_of_turn), new)
    new_attn = (cols <= n_tok[:, None]).to(attention_mask.dtype)
    return torch.cat([input_ids[:, :P], new], 1), torch.cat([attention_mask[:, :P], new_attn], 1)


def accepts_truncated(reward_fn) -> bool:
    """Whether ``reward_fn`` takes a ``truncated`` keyword (or **kwargs): read from its signature,
    so 2-argument reward functions keep working."""
    import inspect

    try:
        params = inspect.signature(reward_fn).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature
        return False
    return any(p.name == "truncated" and p.kind != p.POSITIONAL_ONLY or p.kind == p.VAR_KEYWORD for p in params)


def call_reward_fn(reward_fn: RewardFn, ro: Rollout, device) -> torch.Tensor:
    truncated = getattr(ro, "truncated", None)  # [B] bool: no EOS within max_new_tokens
    pass_truncated = truncated is not None and accepts_truncated(reward_fn)
    kwargs = {"truncated": [bool(t) for t in truncated]} if pass_truncated else {}
    out = reward_fn(list(ro.prompts), list(ro.completions), **kwargs)
    try:
        values = [float(v) for v in out]
    except (TypeError, ValueError):
        raise ValueError(f"reward function must return a list of numbers, got {type(out).__name__}") from None
    if len(values) != len(ro):
        raise ValueError(f"reward function returned {len(values)} scores for {len(ro)} completions")
    if not all(math.isfinite(v) for v in values):
        raise ValueError("reward function returned a non-finite score")
    return torch.tensor(values, dtype=torch.float32, device=device)


def load_reward_fn(spec: str) -> RewardFn:
    """``package.module:function`` or ``path/to/file.py:function``."""
    module_name, _, fn_name = spec.rpartition(":")
    if not module_name or not fn_name:
        raise ValueError(f"reward function {spec!r} must look like 'module:function' or 'file.py:function'")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise FileNotFoundError(f"reward function file not found: {path}")
        mod_spec = importlib.util.spec_from_file_location(f"rlfuse_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[mod_spec.name] = module
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise ValueError(f"cannot import reward function module {module_name!r}: {exc}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"{module_name} has no function {fn_name!r}")
    return fn
