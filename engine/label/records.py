"""The two files of a labelling job, and their checks (every error names file:line).

tasks.jsonl   one prompt and its K >= 2 responses per line, written ahead of time:
    {"id": str, "prompt": str, "system"?: str, "responses": [str, ...], "sampling"?: {...},
     "guidelines"?: str (markdown shown with this task, after the ``--guidelines`` file)}
labels.jsonl  one annotator's verdict on one task per line, appended as it is given:
    {"task_id", "annotator", "prompt", "system"?, "responses": [...] (task order),
     "ranks": [int, ...] | null (ranks[i] of responses[i], 1 = best, equal = tie; null when skipped),
     "skipped": bool, "skip_reason": str, "none_acceptable": bool, "note": str,
     "shown_order": [task index of the card shown 1st, 2nd, ...], "seconds": float | null, "time": str,
     "guidelines_sha256": str | null (the guidelines the label was made under), "revision": int}
A label carries its prompt and responses, so export and stats need no tasks file. The file is
append-only: an annotator who changes a label appends a new one (``revision`` counts the
earlier ones), and the LAST label per (annotator, task) is the one that counts
(:func:`latest_labels`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..textcheck import lone_surrogate_message


@dataclass
class Task:
    id: str
    prompt: str
    responses: list[str]
    system: str | None = None
    sampling: dict = field(default_factory=dict)
    guidelines: str | None = None

    def to_json(self) -> dict:
        d = {"id": self.id, "prompt": self.prompt, "responses": self.responses}
        if self.system is not None:
            d["system"] = self.system
        if self.sampling:
            d["sampling"] = self.sampling
        if self.guidelines is not None:
            d["guidelines"] = self.guidelines
        return d


@dataclass
class Label:
    task_id: str
    annotator: str
    prompt: str
    responses: list[str]
    ranks: list[int] | None
    skipped: bool = False
    none_acceptable: bool = False
    note: str = ""
    shown_order: list[int] = field(default_factory=list)
    seconds: float | None = None
    time: str = ""
    system: str | None = None
    skip_reason: str = ""
    guidelines_sha256: str | None = None
    revision: int = 0

    def to_json(self) -> dict:
        d = asdict(self)
        if self.system is None:
            del d["system"]
        return d


def check_ranks(ranks, k: int) -> str | None:
    """Why ``ranks`` is not a ranking of k responses (1 = best, equal = tie), or None."""
    if not isinstance(ranks, list) or len(ranks) != k:
        return f"'ranks' must be a list of {k} ints (one per response), got {ranks!r}"
    if any(isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= k for r in ranks):
        return f"'ranks' must hold ints from 1 (best) to {k}, got {ranks!r}"
    return None


def latest_labels(labels: list[Label]) -> list[Label]:
    """The last label of each (annotator, task), in the order those last labels were given:
    a re-submitted label supersedes the earlier ones (the file keeps them all)."""
    latest: dict[tuple[str, str], Label] = {}
    for label in labels:
        key = (label.annotator, label.task_id)
        latest.pop(key, None)  # re-inserted at the end: ordered by the label that counts
        latest[key] = label
    return list(latest.values())


def check_order(order, k: int) -> str | None:
    if not isinstance(order, list) or sorted(order) != list(range(k)):
        return f"'shown_order' must be a permutation of 0..{k - 1}, got {order!r}"
    return None


def _no_constant(name: str):
    raise json.JSONDecodeError(f"{name} is not a JSON number", name, 0)


def _lines(path):
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"file not found: {p}")
    with p.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{p}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a leading BOM is harmless
            except UnicodeDecodeError as exc:
                raise ValueError(f"{where}: not valid UTF-8 (byte {exc.start + 1})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line, parse_constant=_no_constant)
            except json.JSONDecodeError as exc:
                hint = " (a truncated last line? delete it)" if not line.endswith("\n") else ""
                raise ValueError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno}){hint}") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            if problem := lone_surrogate_message(rec):  # it could never be written back out
                raise ValueError(f"{where}: {problem}")
            yield where, rec


def _string(rec: dict, key: str, where: str, *, optional: bool = False):
    value = rec.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {value!r}")
    return value


def _responses(rec: dict, where: str) -> list[str]:
    responses = rec.get("responses")
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise ValueError(f"{where}: 'responses' must be a list of strings")
    if len(responses) < 2:
        raise ValueError(f"{where}: a task needs K >= 2 responses to rank, got {len(responses)}")
    return responses


def read_tasks(path) -> list[Task]:
    tasks, seen = [], {}
    for where, rec in _lines(path):
        task_id = rec.get("id")
        if isinstance(task_id, int) and not isinstance(task_id, bool):
            task_id = str(task_id)
        if not isinstance(task_id, str) or not task_id:
            raise ValueError(f"{where}: field 'id' must be a non-empty string, got {rec.get('id')!r}")
        if task_id in seen:
            raise ValueError(f"{where}: task id {task_id!r} repeats the one on line {seen[task_id]}")
        seen[task_id] = where.rsplit(":", 1)[1]
        sampling = rec.get("sampling", {})
        if not isinstance(sampling, dict):
            raise ValueError(f"{where}: 'sampling' must be an object")
        tasks.append(Task(task_id, _string(rec, "prompt", where), _responses(rec, where),
                          _string(rec, "system", where, optional=True), sampling,
                          _string(rec, "guidelines", where, optional=True)))
    if not tasks:
        raise ValueError(f"{path}: no tasks")
    return tasks


def parse_label(rec: dict, where: str) -> Label:
    responses = _responses(rec, where)
    skipped = rec.get("skipped", False)
    if not isinstance(skipped, bool):
        raise ValueError(f"{where}: 'skipped' must be true or false")
    ranks = rec.get("ranks")
    if not skipped and (problem := check_ranks(ranks, len(responses))):
        raise ValueError(f"{where}: {problem}")
    order = rec.get("shown_order") or list(range(len(responses)))
    if problem := check_order(order, len(responses)):
        raise ValueError(f"{where}: {problem}")
    seconds = rec.get("seconds")
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))):
        raise ValueError(f"{where}: 'seconds' must be a number, got {seconds!r}")
    none_ok = rec.get("none_acceptable", False)
    if not isinstance(none_ok, bool):
        raise ValueError(f"{where}: 'none_acceptable' must be true or false")
    revision = rec.get("revision", 0)
    if isinstance(revision, bool) or not isinstance(revision, int) or revision < 0:
        raise ValueError(f"{where}: 'revision' must be an integer >= 0, got {revision!r}")
    return Label(task_id=_string(rec, "task_id", where), annotator=_string(rec, "annotator", where),
                 prompt=_string(rec, "prompt", where), responses=responses, ranks=None if skipped else ranks,
                 skipped=skipped, none_acceptable=none_ok, note=_string(rec, "note", where, optional=True) or "",
                 shown_order=order, seconds=None if seconds is None else float(seconds),
                 time=_string(rec, "time", where, optional=True) or "",
                 system=_string(rec, "system", where, optional=True),
                 skip_reason=_string(rec, "skip_reason", where, optional=True) or "",
                 guidelines_sha256=_string(rec, "guidelines_sha256", where, optional=True), revision=revision)


def read_labels(path, *, missing_ok: bool = False) -> list[Label]:
    if missing_ok and not Path(path).exists():
        return []
    return [parse_label(rec, where) for where, rec in _lines(path)]
