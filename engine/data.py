"""Datasets -> token ids, through the tokenizer's own chat template.

Files are JSONL, or anything ``datasets`` reads (engine/dataset_files.py); TRL's dataset
formats are turned into the records below first (engine/trl_formats.py).

Accepted lines:
    SFT      {"prompt": str, "response": str}   or   {"messages": [{"role", "content"}, ...]}
    RM       {"prompt": str, "chosen": str, "rejected": str}
             {"prompt": str, "response": str, "score": number}        (a rating)
             {"prompt": str, "responses": [str, ...], "ranks": [int, ...]}  (a K-way ranking:
              ranks[i] is the rank of responses[i], 1 = best, equal ranks = a tie)
    prompts  {"prompt": str}   or   {"messages": [...]}   (a trailing assistant turn is dropped)
Any ``prompt`` record may add {"system": str}: a system message before the user turn.
Reward-model sequences are ``reward_ids``: rendered prompt + response + EOS, read at the EOS,
the same layout a PPO rollout is scored in.

Every error names the file and line. Text is rendered with ``apply_chat_template`` and
each piece tokenized separately, so we know exactly which tokens belong to the
assistant (the only ones SFT puts loss on).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .textcheck import lone_surrogate_message


# --------------------------------------------------------------------------- reading

def read_jsonl(path, hint: str = "the stage's data file, e.g. --data train.jsonl") -> list[tuple[int | str, dict]]:
    """(place, record) of every record of a dataset in any format we read: JSONL (place: the
    line number), or through ``datasets`` a save_to_disk folder, parquet, arrow, csv or json
    (place: "row N"; engine/dataset_files.py). Columns are renamed by the run's ``data.*_column``
    keys and TRL's formats turned into ours (engine/trl_formats.py)."""
    from .dataset_files import column_map, is_datasets_source, read_rows, rename
    from .trl_formats import to_engine_record

    if path is not None and Path(path).exists() and is_datasets_source(Path(path)):
        rows = read_rows(path)
    else:
        rows = _read_jsonl_file(path, hint)
    renames = column_map()
    return [(n, to_engine_record(rename(r, renames), _where(path, n))) for n, r in rows]


def _read_jsonl_file(path, hint: str) -> list[tuple[int, dict]]:
    """(line number, record) for every non-blank line; clear errors for the rest: invalid
    UTF-8, malformed JSON and non-finite numbers (NaN, Infinity, 1e999) in any field name
    file:line. ``hint`` says how to give the file when none is given."""
    if path is None:
        raise ValueError(f"no dataset given (pass {hint})")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"dataset not found: {p}")
    rows = []
    with p.open("rb") as fh:  # bytes, so an invalid UTF-8 sequence can be reported with its line
        for lineno, raw in enumerate(fh, start=1):
            try:  # utf-8-sig: a BOM at the start of the file (Windows editors) is accepted
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{p}:{lineno}: not valid UTF-8 (byte {raw[exc.start]:#04x} at column "
                                 f"{exc.start + 1})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line, parse_constant=_reject_constant, parse_float=_finite_float)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{p}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            except _NonFinite as exc:
                raise ValueError(f"{p}:{lineno}: non-finite number {exc} (NaN and infinities are not data)") from None
            if not isinstance(record, dict):
                raise ValueError(f"{p}:{lineno}: expected a JSON object, got {type(record).__name__}")
            if problem := lone_surrogate_message(record):  # the tokenizer would fail on it later
                raise ValueError(f"{p}:{lineno}: {problem}")
            rows.append((lineno, record))
    if not rows:
        raise ValueError(f"{p}: dataset is empty")
    return rows


class _NonFinite(Exception):
    pass


def _reject_constant(name: str):  # json's NaN / Infinity / -Infinity extensions
    raise _NonFinite(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # e.g. 1e999 overflows to inf
        raise _NonFinite(text)
    return value


def finite_number(record: dict, key: str, where: str) -> float:
    """``record[key]`` as a float, or a ValueError naming the place: for any numeric field
    (scores, weights) of any format."""
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: {key!r} must be a number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an integer too large for a float
        raise ValueError(f"{where}: {key!r} is out of range: {record.get(key)!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{where}: {key!r} must be finite, got {value!r}")
    return value


_log = logging.getLogger("rlfuse.data")


def warn(message: str) -> None:
    """A data problem worth knowing but not fatal (with no logging set up, Python prints
    warnings to stderr as they are)."""
    _log.warning("[rlfuse] warning: %s", message)


def _where(path, lineno) -> str:
    return f"{path}:{lineno}"


def _text(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _messages(record: dict, where: str) -> list[dict]:
    msgs = record["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"{where}: 'messages' must be a non-empty list")
    for m in msgs:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"{where}: each message needs string 'role' and 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


# --------------------------------------------------------------------------- chat rendering

def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _encode(tokenizer, text: str) -> list[int]:
    # the template already wrote any BOS/EOS it wants
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def encode_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a whole chat and a 0/1 mask that is 1 on assistant tokens (incl. end-of-turn)."""
    ids, mask, done = [], [], ""
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], add_generation_prompt=True)
        full = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise ValueError("the tokenizer's chat template is not prefix-consistent; cannot find assistant tokens")
        context, answer = _encode(tokenizer, prefix[len(done):]), _encode(tokenizer, full[len(prefix):])
        ids += context + answer
        mask += [0] * len(context) + [1] * len(answer)
        done = full
    return ids, mask


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    return _encode(tokenizer, _render(tokenizer, messages, add_generation_prompt=True))


# --------------------------------------------------------------------------- datasets

@dataclass
class SFTExample:
    input_ids: list[int]
    loss_mask: list[int]


def load_sft_dataset(path, tokenizer, max_length: int) -> list[SFTExample]:
    examples, truncated, dropped = [], 0, 0
    for lineno, rec in read_jsonl(path, "--data sft.jsonl, config key sft.data"):
        where = _where(path, lineno)
        if "messages" in rec:
            msgs = _messages(rec, where)
        elif "prompt" in rec and "response" in rec:
            msgs = prompt_messages(rec, where) + [{"role": "assistant", "content": _text(rec, "response", where)}]
        else:
            raise ValueError(f"{where}: expected {{'prompt', 'response'}} or {{'messages'}}, got keys {sorted(rec)}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError(f"{where}: no assistant message to train on")
        ids, mask = encode_conversation(tokenizer, msgs)
        truncated += len(ids) > max_length
        ids, mask = ids[:max_length], mask[:max_length]  # keep the start: the prompt conditions the answer
        if sum(mask[1:]) > 0:  # the first token is never predicted
            examples.append(SFTExample(ids, mask))
        else:
            dropped += 1
    if truncated:
        warn(f"{path}: {truncated} example(s) longer than sft.max_length={max_length} tokens were cut to it"
             + (f"; {dropped} of them kept no response token and were dropped" if dropped else ""))
    if not examples:
        raise ValueError(f"{path}: no example has response tokens within max_length={max_length}")
    return examples


@dataclass
class PreferencePair:
    chosen_ids: list[int]
    rejected_ids: list[int]


@dataclass
class Rating:
    input_ids: list[int]
    score: float


def prompt_messages(record: dict, where: str) -> list[dict]:
    """The chat a record's response answers: its ``messages`` (a trailing assistant turn
    dropped), or an optional ``system`` message plus the ``prompt`` as the user turn."""
    if "messages" in record:
        msgs = _messages(record, where)
        if msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if not msgs:
            raise ValueError(f"{where}: no prompt left after dropping the assistant turn")
        return msgs
    msgs = [{"role": "system", "content": _text(record, "system", where)}] if "system" in record else []
    return msgs + [{"role": "user", "content": _text(record, "prompt", where) if "prompt" in record else ""}]


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant turn (and stops generation): the tokenizer's EOS."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; the reward model reads its score at the EOS")
    return tokenizer.eos_token_id


def reward_ids(tokenizer, messages: list[dict], response: str, max_length: int) -> list[int]:
    """The ONE token layout the reward model is trained on and scored with (RM training,
    PPO rollouts, evaluations): the rendered prompt (generation prompt included) + the
    response's tokens + one EOS, the score being read at that EOS. This is exactly what the
    policy produces in a rollout (a truncated completion gets the EOS appended), and not the
    template's full rendering, which may add tokens after the EOS (ChatML: a newline)."""
    ids = encode_prompt(tokenizer, messages) + _encode(tokenizer, response) + [end_of_turn_id(tokenizer)]
    return ids[-max_length:]  # keep the end: the reward is read at the last token


def _chat_ids(tokenizer, prompt: str, response: str, max_length: int) -> list[int]:
    return reward_ids(tokenizer, [{"role": "user", "content": prompt}], response, max_length)


def load_reward_dataset(path, tokenizer, max_length: int, *, allow_empty: bool = False):
    """Pairs and ratings from one JSONL file (lines of either kind may be mixed); the
    context is ``prompt`` (with an optional ``system``) or ``messages``."""
    pairs, ratings = [], []
    if path is None:
        return pairs, ratings
    long, same = [0], 0

    def fit(ids: list[int]) -> list[int]:
        long[0] += len(ids) > max_length
        return ids[-max_length:]  # keep the end: the reward is read at the last token

    unbounded = 1 << 62  # reward_ids' own cut would hide how many were too long
    for lineno, rec in read_jsonl(path, "--data prefs.jsonl, config key rm.data"):
        where = _where(path, lineno)
        if "chosen" in rec and "rejected" in rec:
            msgs = prompt_messages(rec, where)
            chosen, rejected = _text(rec, "chosen", where), _text(rec, "rejected", where)
            if chosen == rejected:  # no preference to learn from
                same += 1
                continue
            pairs.append(PreferencePair(fit(reward_ids(tokenizer, msgs, chosen, unbounded)),
                                        fit(reward_ids(tokenizer, msgs, rejected, unbounded))))
        elif "response" in rec and "score" in rec:
            score = finite_number(rec, "score", where)
            msgs = prompt_messages(rec, where)
            ratings.append(Rating(fit(reward_ids(tokenizer, msgs, _text(rec, "response", where), unbounded)), score))
        else:
            raise ValueError(f"{where}: expected {{'prompt', 'chosen', 'rejected'}} or "
                             f"{{'prompt', 'response', 'score'}}, got keys {sorted(rec)}")
    if same:
        warn(f"{path}: dropped {same} pair(s) whose chosen and rejected texts are identical")
    if long[0]:
        warn(f"{path}: {long[0]} sequence(s) longer than rm.max_length={max_length} tokens keep only their "
             "last max_length tokens")
    return pairs, ratings


@dataclass
class Ranking:
    """One prompt's K >= 2 responses and their ranks (1 = best, equal = tie). A pair line
    is a K=2 ranking. ``prompt_key`` identifies the prompt, to split train/held-out by prompt."""
    prompt_key: str
    response_ids: list[list[int]]
    ranks: list[int]


def _ranking(rec: dict, where: str) -> tuple[list[str], list[int]]:
    responses, ranks = rec["responses"], rec.get("ranks")
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise ValueError(f"{where}: 'responses' must be a list of strings")
    if len(responses) < 2:
        raise ValueError(f"{where}: a ranking needs K >= 2 responses, got {len(responses)}")
    if not isinstance(ranks, list) or len(ranks) != len(responses):
        raise ValueError(f"{where}: 'ranks' must be a list of {len(responses)} ints (one per response), got {ranks!r}")
    if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
        raise ValueError(f"{where}: 'ranks' must hold ints >= 1 (1 = best), got {ranks!r}")
    for i in range(len(responses)):
        for j in range(i):
            if responses[i] == responses[j] and ranks[i] != ranks[j]:
                raise ValueError(f"{where}: responses {j} and {i} are the same text but ranked {ranks[j]} and {ranks[i]}")
    return responses, ranks


def load_rankings(path, tokenizer, max_length: int) -> tuple[list[Ranking], list[Rating]]:
    """Rankings and ratings from one JSONL file where ranking, pair (a K=2 ranking: chosen
    rank 1, rejected rank 2) and rating lines may be mixed."""
    rankings, ratings, long = [], [], [0]

    def ids(msgs: list[dict], response: str) -> list[int]:
        seq = reward_ids(tokenizer, msgs, response, 1 << 62)  # uncut, to count the sequences that are too long
        long[0] += len(seq) > max_length
        return seq[-max_length:]  # keep the end: the reward is read at the last token

    for lineno, rec in read_jsonl(path, "--data prefs.jsonl, config key rm.data"):
        where = _where(path, lineno)
        if "responses" in rec:
            responses, ranks = _ranking(rec, where)
        elif "chosen" in rec and "rejected" in rec:
            responses, ranks = [_text(rec, "chosen", where), _text(rec, "rejected", where)], [1, 2]
            if responses[0] == responses[1]:
                ranks = [1, 1]  # identical texts carry no preference (the trainer drops tie-only rankings)
        elif "response" in rec and "score" in rec:
            score = finite_number(rec, "score", where)
            ratings.append(Rating(ids(prompt_messages(rec, where), _text(rec, "response", where)), score))
            continue
        else:
            raise ValueError(f"{where}: expected {{'prompt', 'responses', 'ranks'}}, {{'prompt', 'chosen', "
                             f"'rejected'}} or {{'prompt', 'response', 'score'}}, got keys {sorted(rec)}")
        msgs = prompt_messages(rec, where)
        rankings.append(Ranking(json.dumps(msgs, sort_keys=True), [ids(msgs, r) for r in responses], list(ranks)))
    if long[0]:
        warn(f"{path}: {long[0]} sequence(s) longer than rm.max_length={max_length} tokens keep only their "
             "last max_length tokens")
    return rankings, ratings


@dataclass
class Prompt:
    raw: str  # the user's text (the last user message), as a reward function sees it
    text: str  # the rendered chat prompt, as the policy sees it
    input_ids: list[int]


def load_prompts(path, tokenizer, max_length: int) -> list[Prompt]:
    prompts, truncated = [], 0
    for lineno, rec in read_jsonl(path, "--prompts prompts.jsonl, config key ppo.prompts"):
        where = _where(path, lineno)
        if "messages" not in rec and "prompt" not in rec:
            raise ValueError(f"{where}: expected {{'prompt'}} or {{'messages'}}, got keys {sorted(rec)}")
        msgs = prompt_messages(rec, where)
        ids = encode_prompt(tokenizer, msgs)
        truncated += len(ids) > max_length
        ids = ids[-max_length:]  # keep the end: the generation prompt
        raw = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), msgs[-1]["content"])
        prompts.append(Prompt(raw, _render(tokenizer, msgs, add_generation_prompt=True), ids))
    if truncated:
        warn(f"{path}: {truncated} prompt(s) longer than ppo.max_prompt_length={max_length} tokens keep only "
             "their last max_prompt_length tokens")
    return prompts


# --------------------------------------------------------------------------- batching

def pad(seqs: list[list[int]], pad_id: int, *, side: str = "right", device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to [B, T_max]; returns (ids, attention_mask)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "right":
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        else:
            ids[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, T - len(s):] = 1
    return ids.to(device), mask.to(device)


def epoch_batches(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Indices of the batch for a global ``step``: a fresh permutation per epoch seeded by
    (seed, epoch), so any step's batch is known without replaying earlier ones (resume)."""
    per_epoch = max(1, -(-n // batch_size))
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    return perm[k * batch_size: (k + 1) * batch_size]


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, -(-n // batch_size))
