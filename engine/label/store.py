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


class LabelStore:
    def __init__(self, tasks: list[Task], labels_path, *, overlap: int = 1):
        if overlap < 1:
            raise ValueError(f"--overlap must be >= 1, got {overlap}")
        self.tasks, self.overlap, self.path = tasks, overlap, Path(labels_path)
        self.by_id = {t.id: t for t in tasks}
        self._lock = threading.Lock()
        self._done: dict[str, set[str]] = {}  # annotator -> task ids labelled or skipped
        self._holders: dict[str, set[str]] = {t.id: set() for t in tasks}  # task -> annotators who labelled it
        self._claims: dict[str, str] = {}  # annotator -> the task on their screen
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
        self._done.setdefault(label.annotator, set()).add(label.task_id)
        if not label.skipped:
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
        order = shown_order(annotator, task)
        return {"task": {"id": task.id, "prompt": task.prompt, "system": task.system,
                         "cards": [{"index": i, "text": task.responses[i]} for i in order]},
                "shown_order": order, **progress}

    def submit(self, annotator, task_id, *, ranks=None, skipped: bool = False, note: str = "",
               none_acceptable: bool = False, order=None, seconds=None) -> Label:
        """Check, append (flush + fsync) and count one label; LabelError says why one is refused."""
        annotator = check_annotator(annotator)
        task = self.by_id.get(task_id) if isinstance(task_id, str) else None
        if task is None:
            raise LabelError(404, f"unknown task id {task_id!r}")
        k = len(task.responses)
        if not isinstance(skipped, bool) or not isinstance(none_acceptable, bool):
            raise LabelError(400, "'skipped' and 'none_acceptable' must be true or false")
        if not skipped and (problem := check_ranks(ranks, k)):
            raise LabelError(400, problem)
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
                      time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), system=task.system)
        line = json.dumps(label.to_json(), ensure_ascii=False) + "\n"
        with self._lock:
            if task.id in self._done.get(annotator, ()):
                raise LabelError(409, f"{annotator!r} already labelled task {task.id!r}")
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
