"""The label log behind the page: who sees which task next, and the append-only labels file.

Every accepted label is appended to labels.jsonl as one line, flushed and fsynced before the
request is answered, under one lock (the server runs a thread per request), so a killed
server loses nothing that was acknowledged and two concurrent submissions never interleave
or duplicate. A restart reads the file back: each annotator resumes at their first task not
yet done.

Assignment: tasks go out in file order. A task is open to an annotator who has not yet
labelled or skipped it while fewer than ``overlap`` annotators hold it (labelled it, or have
it on screen now). Skips do not count towards the overlap, so someone else gets the task.
Card order is shuffled per (annotator, task), the same after a reload or a restart.

Going back: an annotator's history is their latest label per task. Re-submitting a task from
the history (``revise=True``) appends a new label that supersedes the earlier one (a skip
turned into a ranking is how a skip is undone); nothing in the file is rewritten.

Guidelines (the ``--guidelines`` file, then the task's own ``guidelines``) go out with each
task with their SHA-256; a label records the hash it was made under, and a page that shows an
older version than the server's (the file changed and the server restarted) is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from pathlib import Path

from ..textcheck import lone_surrogate_message
from .records import Label, Task, check_order, check_ranks, read_labels

MAX_NAME = 64
MAX_REASON = 200


class LabelError(ValueError):
    """A refused submission; ``status`` is the HTTP status the server answers with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def shown_order(annotator: str, task: Task) -> list[int]:
    """Task indices of the cards in the order this annotator sees them (stable per pair)."""
    seed = int.from_bytes(hashlib.sha256(f"{annotator}\0{task.id}".encode()).digest()[:8], "big")
    order = list(range(len(task.responses)))
    random.Random(seed).shuffle(order)
    return order


def check_annotator(name) -> str:
    if not isinstance(name, str) or not name.strip():
        raise LabelError(400, "an annotator name is required")
    name = name.strip()
    if problem := lone_surrogate_message(name):
        raise LabelError(400, f"annotator name: {problem}")
    if len(name) > MAX_NAME:
        raise LabelError(400, f"annotator name longer than {MAX_NAME} characters")
    return name


def task_guidelines(guidelines: str | None, task: Task) -> str | None:
    """The guidelines shown with ``task``: the file's, then the task's own, a blank line between."""
    parts = [g for g in (guidelines, task.guidelines) if g and g.strip()]
    return "\n\n".join(parts) if parts else None


def text_sha256(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


class LabelStore:
    def __init__(self, tasks: list[Task], labels_path, *, overlap: int = 1, guidelines: str | None = None):
        if overlap < 1:
            raise ValueError(f"--overlap must be >= 1, got {overlap}")
        self.tasks, self.overlap, self.path, self.guidelines = tasks, overlap, Path(labels_path), guidelines
        self.by_id = {t.id: t for t in tasks}
        self._lock = threading.Lock()
        self._done: dict[str, set[str]] = {}  # annotator -> task ids labelled or skipped
        self._holders: dict[str, set[str]] = {t.id: set() for t in tasks}  # task -> annotators who ranked it
        self._claims: dict[str, str] = {}  # annotator -> the task on their screen
        self._latest: dict[tuple[str, str], Label] = {}  # (annotator, task) -> the label that counts, oldest first
        for label in read_labels(self.path, missing_ok=True):
            if label.task_id not in self.by_id:
                raise ValueError(f"{self.path}: label for task {label.task_id!r}, which is not in the tasks file "
                                 "(labels of another tasks file?)")
            self._record(label)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a", encoding="utf-8")
        self._end_last_line()

    def _end_last_line(self) -> None:
        """A file whose last line lacks its newline (edited by hand, copied, cut short after a
        complete record) would get the next label glued onto that line: end it first."""
        size = self.path.stat().st_size
        if size == 0:
            return
        with self.path.open("rb") as fh:
            fh.seek(size - 1)
            last = fh.read(1)
        if last != b"\n":
            self._fh.write("\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def _record(self, label: Label) -> None:
        key = (label.annotator, label.task_id)
        self._latest.pop(key, None)  # re-inserted last: the history lists the newest last
        self._latest[key] = label
        self._done.setdefault(label.annotator, set()).add(label.task_id)
        if label.skipped:
            self._holders[label.task_id].discard(label.annotator)
        else:
            self._holders[label.task_id].add(label.annotator)

    def _open_to(self, annotator: str, task: Task) -> bool:
        if task.id in self._done.get(annotator, ()):
            return False
        holders = self._holders[task.id] | {a for a, t in self._claims.items() if t == task.id}
        return annotator in holders or len(holders) < self.overlap

    def progress(self, annotator: str) -> dict:
        with self._lock:
            return self._progress(annotator)

    def _progress(self, annotator: str) -> dict:
        done = len(self._done.get(annotator, ()))
        return {"done": done, "total": done + sum(self._open_to(annotator, t) for t in self.tasks)}

    def next_task(self, annotator: str) -> dict:
        """The task to show ``annotator`` now (None when nothing is left), its card order, progress."""
        annotator = check_annotator(annotator)
        with self._lock:
            self._claims.pop(annotator, None)
            task = next((t for t in self.tasks if self._open_to(annotator, t)), None)
            if task is not None:
                self._claims[annotator] = task.id
            progress = self._progress(annotator)
        if task is None:
            return {"task": None, **progress}
        return {**self._view(annotator, task), **progress}

    def _view(self, annotator: str, task: Task) -> dict:
        order = shown_order(annotator, task)
        guidelines = task_guidelines(self.guidelines, task)
        return {"task": {"id": task.id, "prompt": task.prompt, "system": task.system,
                         "cards": [{"index": i, "text": task.responses[i]} for i in order],
                         "guidelines": guidelines, "guidelines_sha256": text_sha256(guidelines)},
                "shown_order": order}

    def _task(self, task_id) -> Task:
        task = self.by_id.get(task_id) if isinstance(task_id, str) else None
        if task is None:
            raise LabelError(404, f"unknown task id {task_id!r}")
        return task

    def history(self, annotator) -> dict:
        """This annotator's labelled and skipped tasks, newest first, each with the label that counts."""
        annotator = check_annotator(annotator)
        with self._lock:
            mine = [lb for (a, _), lb in self._latest.items() if a == annotator]
        return {"items": [{"task_id": lb.task_id, "prompt": lb.prompt[:200], "skipped": lb.skipped,
                           "skip_reason": lb.skip_reason, "ranks": lb.ranks, "time": lb.time,
                           "revision": lb.revision} for lb in reversed(mine)]}

    def reopen(self, annotator, task_id) -> dict:
        """A task from this annotator's history, with their saved label, to review or change."""
        annotator = check_annotator(annotator)
        task = self._task(task_id)
        with self._lock:
            saved = self._latest.get((annotator, task.id))
        if saved is None:
            raise LabelError(409, f"{annotator!r} has not labelled task {task.id!r}: there is nothing to reopen")
        return {**self._view(annotator, task),
                "saved": {"ranks": saved.ranks, "skipped": saved.skipped, "skip_reason": saved.skip_reason,
                          "note": saved.note, "none_acceptable": saved.none_acceptable,
                          "revision": saved.revision, "time": saved.time}}

    def submit(self, annotator, task_id, *, ranks=None, skipped: bool = False, note: str = "",
               none_acceptable: bool = False, order=None, seconds=None, skip_reason: str = "",
               revise: bool = False, guidelines_sha256=None) -> Label:
        """Check, append (flush + fsync) and count one label; LabelError says why one is refused.

        ``revise`` re-submits a task this annotator already labelled or skipped (the new label
        supersedes the old); without it a second label for the same task is refused (409), so a
        double click or a second tab never labels twice by accident."""
        annotator = check_annotator(annotator)
        task = self._task(task_id)
        k = len(task.responses)
        if not all(isinstance(flag, bool) for flag in (skipped, none_acceptable, revise)):
            raise LabelError(400, "'skipped', 'none_acceptable' and 'revise' must be true or false")
        if not skipped and (problem := check_ranks(ranks, k)):
            raise LabelError(400, problem)
        if not isinstance(skip_reason, str) or len(skip_reason) > MAX_REASON:
            raise LabelError(400, f"'skip_reason' must be a string of at most {MAX_REASON} characters")
        if skip_reason and not skipped:
            raise LabelError(400, "'skip_reason' is only for a skipped item")
        if problem := lone_surrogate_message(skip_reason, "skip_reason"):
            raise LabelError(400, problem)
        current = text_sha256(task_guidelines(self.guidelines, task))
        if guidelines_sha256 is not None and guidelines_sha256 != current:
            raise LabelError(409, f"the guidelines of task {task.id!r} changed since the page showed them: "
                                  "reload the page and read the new version")
        order = shown_order(annotator, task) if order is None else order
        if problem := check_order(order, k):
            raise LabelError(400, problem)
        if not isinstance(note, str):
            raise LabelError(400, "'note' must be a string")
        if problem := lone_surrogate_message(note, "note"):  # would not encode into the file
            raise LabelError(400, problem)
        if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                    or not 0 <= seconds < 1e7):
            raise LabelError(400, f"'seconds' must be a number of seconds, got {seconds!r}")
        label = Label(task_id=task.id, annotator=annotator, prompt=task.prompt, responses=task.responses,
                      ranks=None if skipped else ranks, skipped=skipped, none_acceptable=none_acceptable,
                      note=note[:5000], shown_order=order, seconds=None if seconds is None else float(seconds),
                      time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), system=task.system,
                      skip_reason=skip_reason if skipped else "", guidelines_sha256=current)
        with self._lock:
            earlier = self._latest.get((annotator, task.id))
            if earlier is not None and not revise:
                raise LabelError(409, f"{annotator!r} already labelled task {task.id!r} "
                                      "(reopen it from the history to change the label)")
            if earlier is None and revise:
                raise LabelError(409, f"{annotator!r} has no label of task {task.id!r} to revise")
            label.revision = 0 if earlier is None else earlier.revision + 1
            line = json.dumps(label.to_json(), ensure_ascii=False) + "\n"
            self._fh.write(line)
            self._fh.flush()
            os.fsync(self._fh.fileno())  # acknowledged means on disk
            self._record(label)
            if self._claims.get(annotator) == task.id:
                del self._claims[annotator]
        return label

    def close(self) -> None:
        with self._lock:
            self._fh.close()
