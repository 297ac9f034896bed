"""Text that cannot be written as UTF-8: lone surrogates.

JSON may spell a UTF-16 surrogate on its own (``"\\ud83d"``, half of an emoji cut in two);
``json.loads`` turns it into a Python str that no UTF-8 encoder, tokenizer or file accepts.
Readers call :func:`find_lone_surrogate` on each record they parse, so such text is refused
where it came in (file:line, or an HTTP 400), not where it is later written or tokenized.
"""

from __future__ import annotations


def _in_string(text: str) -> int | None:
    """Index of the first lone surrogate in ``text``, or None."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as exc:
        return exc.start


def find_lone_surrogate(value, field: str = "") -> str | None:
    """Where the first lone surrogate in ``value`` (a str, or JSON made of dicts and lists) is,
    as a phrase like ``field 'note' (\\ud83d at character 5)``, or None when all text is valid."""
    if isinstance(value, str):
        at = _in_string(value)
        if at is None:
            return None
        name = f"field {field!r} " if field else ""
        return f"{name}(\\u{ord(value[at]):04x} at character {at + 1})"
    if isinstance(value, dict):
        for key, item in value.items():
            sub = f"{field}.{key}" if field else str(key)
            if isinstance(key, str) and _in_string(key) is not None:
                return f"a field name ({find_lone_surrogate(key)})"
            if (found := find_lone_surrogate(item, sub)) is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if (found := find_lone_surrogate(item, f"{field}[{i}]")) is not None:
                return found
    return None


def lone_surrogate_message(value, field: str = "") -> str | None:
    """A whole sentence for an error, or None: what is wrong and what to do."""
    found = find_lone_surrogate(value, field)
    if found is None:
        return None
    return (f"text holds a lone surrogate in {found}: half of a UTF-16 pair, not valid Unicode; "
            "remove it or write the whole character")
