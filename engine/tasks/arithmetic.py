"""The arithmetic task of the RLHF explainers: "What's 4-2 and 3-1?".

Every prompt asks two single-digit additions or subtractions (never a negative result).
The module gives everything the demo needs and nothing model-specific:

    prompts        ``train_prompts`` / ``heldout_prompts``: a fixed split by a hash of the
                   prompt text, so no held-out prompt can ever appear in training
    parsing        ``parse_answer``: the two numbers of a free-form answer, or None
    grading        ``grade`` / ``is_correct``: exact-answer correctness per problem
    reward         ``reward(prompts, completions) -> list[float]``: the scripted reward,
                   usable as ``--reward-fn rlfuse.engine.tasks.arithmetic:reward``
    SFT data       ``ideal_response``: "4-2 = 2 and 3-1 = 2." (``final=True`` adds
                   ", so the answers are 2 and 2.")
    annotator      ``rank_key`` / ``preference_pairs``: a scripted rater that orders sampled
                   answers by correctness, then format, then brevity (standing in for people)
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from itertools import combinations

OPS = "+-"
HELDOUT_BUCKETS = 10  # one prompt in ten (by hash) is held out, whatever the seed


@dataclass(frozen=True)
class Problem:
    a: int
    op: str
    b: int

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    def __str__(self) -> str:
        return f"{self.a}{self.op}{self.b}"


def all_problems() -> list[Problem]:
    """Single-digit additions and subtractions with a non-negative result (155 of them)."""
    return [Problem(a, op, b) for op in OPS for a in range(10) for b in range(10) if op == "+" or a >= b]


def format_prompt(p: Problem, q: Problem) -> str:
    return f"What's {p} and {q}?"


def _bucket(prompt: str) -> int:
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") % HELDOUT_BUCKETS


def is_heldout(prompt: str) -> bool:
    return _bucket(prompt) == 0


def _split(heldout: bool) -> list[tuple[Problem, Problem]]:
    probs = all_problems()
    return [(p, q) for p in probs for q in probs if p != q and is_heldout(format_prompt(p, q)) == heldout]


def _sample(pairs, n: int, seed: int) -> list[str]:
    if n > len(pairs):
        raise ValueError(f"asked for {n} prompts, the split has {len(pairs)}")
    return [format_prompt(p, q) for p, q in random.Random(seed).sample(pairs, n)]


def train_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct training prompts (a seeded sample of the ~90% training split)."""
    return _sample(_split(heldout=False), n, seed)


def heldout_prompts(n: int, seed: int = 1234) -> list[str]:
    """``n`` distinct held-out prompts. The split never depends on ``seed``; the default
    seed keeps the evaluation set the same across runs."""
    return _sample(_split(heldout=True), n, seed)


# --------------------------------------------------------------------------- parsing

_EXPR = re.compile(r"(\d+)\s*([+\-])\s*(\d+)")
_NUM = r"(-?\d+)"
# "the answers are 2 and 2", "answers: 2, 2", "answer is 2 and 2" (the last such phrase wins)
_FINAL = re.compile(r"answers?\s*(?:are|is|:|=|would be|will be)?\s*:?\s*" + _NUM + r"\s*(?:,\s*and|,|and|&)\s*" + _NUM,
                    re.IGNORECASE)


def _normalise(text: str) -> str:
    text = text.replace("\u2212", "-").replace("\u2013", "-").replace("\u2014", "-")
    text = re.sub(r"\bminus\b", "-", text, flags=re.IGNORECASE)
    text = re.sub(r"\bplus\b", "+", text, flags=re.IGNORECASE)
    text = re.sub(r"\*\*|__|`", "", text)  # markdown emphasis around numbers
    return text


def problems_in(prompt: str) -> tuple[Problem, Problem] | None:
    """The two problems of a prompt (the last two expressions, so a chat-rendered prompt works)."""
    found = _EXPR.findall(_normalise(prompt))
    if len(found) < 2:
        return None
    (a, op, b), (c, op2, d) = found[-2:]
    return Problem(int(a), op, int(b)), Problem(int(c), op2, int(d))


def _equation_result(text: str, p: Problem) -> int | None:
    """The number after the first "a op b = X" (or "is"/"equals") for problem ``p``."""
    pat = rf"(?<!\d){p.a}\s*\{p.op}\s*{p.b}\s*(?:=|is|equals|gives|makes)\s*{_NUM}"
    m = re.search(pat, text, re.IGNORECASE)
    return int(m.group(1)) if m else None


def parse_answer(text: str, problems: tuple[Problem, Problem] | None = None) -> tuple[int | None, int | None] | None:
    """The answer's two numbers, in the order of the question, or None when it gives none.

    An explicit final phrase ("the answers are X and Y") wins; otherwise, when the problems
    are known, each one's "a op b = X" equation is read (either may be missing, giving None
    in its place). Bare numbers are never guessed at: echoing the question is not answering.
    """
    text = _normalise(text)
    finals = _FINAL.findall(text)
    if finals:
        x, y = finals[-1]
        return int(x), int(y)
    if problems is None:
        return None
    found = tuple(_equation_result(text, p) for p in problems)
    return None if found == (None, None) else found


def grade(prompt: str, completion: str) -> tuple[int, bool]:
    """(number of the two answers that are right, whether the answer used the final phrase)."""
    probs = problems_in(prompt)
    if probs is None:
        raise ValueError(f"not an arithmetic prompt: {prompt!r}")
    parsed = parse_answer(completion, probs)
    if parsed is None:
        return 0, False
    n_right = sum(int(x is not None and x == p.answer) for x, p in zip(parsed, probs))
    return n_right, bool(_FINAL.search(_normalise(completion)))


def is_correct(prompt: str, completion: str) -> bool:
    """Exact answer: both numbers right."""
    return grade(prompt, completion)[0] == 2


def reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Scripted reward: the share of the two answers that are right (0, 0.5 or 1)."""
    return [grade(p, c)[0] / 2.0 for p, c in zip(prompts, completions)]


def ideal_response(prompt: str, final: bool = False) -> str:
    """The answer SFT teaches: both equations (16 tokens with SmolLM2's tokenizer; the final
    phrase would add 10 more to every sample, score and update of the demo)."""
    p, q = problems_in(prompt)
    if final:
        return f"{p} = {p.answer} and {q} = {q.answer}, so the answers are {p.answer} and {q.answer}."
    return f"{p} = {p.answer} and {q} = {q.answer}."


# --------------------------------------------------------------------------- annotator

def rank_key(prompt: str, completion: str) -> tuple:
    """What the scripted rater prefers, most important first: more right answers, then an
    answer it can read (both results stated), then a shorter reply. Higher is better."""
    n_right, has_final = grade(prompt, completion)
    parsed = parse_answer(completion, problems_in(prompt))
    readable = parsed is not None and None not in parsed
    return n_right, int(readable) + int(has_final), -len(completion)


def preference_pairs(prompt: str, completions: list[str], *, max_pairs: int = 4,
                     correctness_only: bool = True) -> list[dict]:
    """Rank one prompt's sampled answers and emit ``{"prompt", "chosen", "rejected"}`` pairs.

    Pairs are taken between answers whose keys differ, best-separated first (more right
    answers, then format); with ``correctness_only`` a pair must differ in correctness, so
    the reward model learns what people grade, not length. Duplicate texts count once.
    """
    unique = list(dict.fromkeys(completions))
    keyed = sorted(((rank_key(prompt, c), c) for c in unique), key=lambda kc: kc[0], reverse=True)
    candidates = []
    for (ki, ci), (kj, cj) in combinations(keyed, 2):  # ki >= kj
        if ki == kj or (correctness_only and ki[0] == kj[0]):
            continue
        candidates.append(((ki[0] - kj[0], ki[1] - kj[1]), ci, cj))
    candidates.sort(key=lambda t: t[0], reverse=True)  # stable: ties keep the rank order
    return [{"prompt": prompt, "chosen": ci, "rejected": cj} for _, ci, cj in candidates[:max_pairs]]


def synthetic_pairs(prompt: str, rng: random.Random, *, n: int = 1) -> list[dict]:
    """Cheap preference pairs the scripted rater can rank without sampling the policy: the
    ideal answer (chosen) against a near miss (rejected): mostly the same answer with ONE
    result off by 1-3 (the distinction the reward model must learn), sometimes both results
    off, sometimes the answer cut short. On-policy pairs (sampled answers) complement these
    so the reward model also sees what the policy writes."""
    p, q = problems_in(prompt)
    chosen = ideal_response(prompt)
    out = []
    for _ in range(n):
        kind = rng.random()
        ra, rb = p.answer, q.answer

        def off(x: int) -> int:
            return max(0, x + rng.choice([d for d in (-3, -2, -1, 1, 2, 3) if x + d >= 0]))

        if kind < 0.75:  # one result wrong
            if rng.random() < 0.5:
                ra = off(ra)
            else:
                rb = off(rb)
            rejected = f"{p} = {ra} and {q} = {rb}."
        elif kind < 0.9:  # both wrong
            rejected = f"{p} = {off(ra)} and {q} = {off(rb)}."
        else:  # cut short
            rejected = rng.choice([f"{p} = {ra} and {q} =", f"{p} = {ra}", f"{p} = {ra} and"])
        assert rank_key(prompt, chosen) > rank_key(prompt, rejected)
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out
