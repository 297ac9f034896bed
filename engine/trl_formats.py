"""TRL's dataset formats -> the engine's records (engine/data.py), in standard (strings) and
conversational (message lists) form:

    prompt-only          {"prompt": str | [messages]}
    prompt-completion    {"prompt": str | [messages], "completion": str | [messages]}
    preference           {"prompt": ..., "chosen": ..., "rejected": ...}        explicit prompt
                         {"chosen": str | [messages], "rejected": str | [messages]}  implicit prompt:
                         the common start of chosen and rejected (whole messages, or for strings
                         the common text up to a word boundary)

They become ``messages`` (a conversational prompt, plus the completion for SFT), ``response``
(a standard completion) and ``chosen`` / ``rejected`` as assistant texts. Records already in
the engine's own shape pass through unchanged. Errors name the record's place.
"""

from __future__ import annotations


def _content(value, where: str, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # content parts: [{"type": "text", "text": ...}, ...]
        texts = [p.get("text") for p in value if isinstance(p, dict) and p.get("type", "text") == "text"]
        if len(texts) == len(value) and all(isinstance(t, str) for t in texts):
            return "".join(texts)
    raise ValueError(f"{where}: {field}: each message's 'content' must be a string (or text parts)")


def message_list(value, where: str, field: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: {field!r} must be a non-empty list of messages")
    out = []
    for m in value:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m):
            raise ValueError(f"{where}: {field!r}: each message needs a string 'role' and a 'content'")
        out.append({"role": m["role"], "content": _content(m["content"], where, field)})
    return out


def _assistant_text(messages: list[dict], where: str, field: str) -> str:
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise ValueError(f"{where}: {field!r} must be one assistant message after the prompt, got roles "
                         f"{[m['role'] for m in messages]}")
    return messages[0]["content"]


def _split_common_text(a: str, b: str) -> int:
    """Length of the common start of ``a`` and ``b``, cut back to a word boundary."""
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    if k < len(a) or k < len(b):
        while k > 0 and not a[k - 1].isspace():
            k -= 1
    return k


def to_engine_record(rec: dict, where: str) -> dict:
    rec = dict(rec)
    msgs = rec.get("messages")
    if isinstance(msgs, list) and any(isinstance(m, dict) and isinstance(m.get("content"), list) for m in msgs):
        rec["messages"] = message_list(msgs, where, "messages")  # content parts -> text (else data.py checks it)
    completion = rec.get("completion")
    if isinstance(rec.get("prompt"), list):  # conversational
        msgs = message_list(rec.pop("prompt"), where, "prompt")
        if isinstance(completion, list):
            msgs = msgs + message_list(rec.pop("completion"), where, "completion")
        elif isinstance(completion, str):
            msgs = msgs + [{"role": "assistant", "content": rec.pop("completion")}]
        rec["messages"] = msgs
    elif isinstance(completion, (str, list)) and "response" not in rec:
        rec["response"] = (completion if isinstance(completion, str)
                           else _assistant_text(message_list(completion, where, "completion"), where, "completion"))
        del rec["completion"]

    chosen, rejected = rec.get("chosen"), rec.get("rejected")
    if isinstance(chosen, list) or isinstance(rejected, list):
        chosen, rejected = message_list(chosen, where, "chosen"), message_list(rejected, where, "rejected")
        if "messages" not in rec and "prompt" not in rec:  # implicit prompt: the shared first messages
            k = 0
            while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
                k += 1
            if k == 0:
                raise ValueError(f"{where}: 'chosen' and 'rejected' share no prompt messages (implicit-prompt "
                                 "preference needs the same conversation before the two answers)")
            rec["messages"], chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
        rec["chosen"] = _assistant_text(chosen, where, "chosen")
        rec["rejected"] = _assistant_text(rejected, where, "rejected")
    elif (isinstance(chosen, str) and isinstance(rejected, str) and "prompt" not in rec
          and "messages" not in rec):  # implicit prompt in plain text
        k = _split_common_text(chosen, rejected)
        rec["prompt"], rec["chosen"], rec["rejected"] = chosen[:k].rstrip(), chosen[k:], rejected[k:]
    return rec
