"""``rlfuse label serve`` without a browser: HTTP requests against a server thread on port 0."""

from __future__ import annotations

import hashlib
import json
import threading
import urllib.error
import urllib.request

import pytest
from engine_helpers import read_rows, write_jsonl
from label_helpers import server_threads, stop_server as stop

from rlfuse.engine.label.records import read_labels, read_tasks
from rlfuse.engine.label.server import make_server
from rlfuse.engine.label.store import LabelStore, shown_order

TASKS = [{"id": f"t{i}", "prompt": f"What's {i}+1?", "responses": [f"{i + 1}", f"{i + 2}", f"maybe {i}"]}
         for i in range(5)]


@pytest.fixture
def tasks_file(tmp_path):
    return write_jsonl(tmp_path / "tasks.jsonl", TASKS)


@pytest.fixture
def start(tmp_path, tasks_file):
    with server_threads() as run:
        yield lambda *, overlap=1, token=None, labels=None: run(
            tasks_file, labels or tmp_path / "labels.jsonl", overlap=overlap, token=token)


def call(server, path, body=None, headers=None):
    """(status, JSON answer)."""
    port = server.server_address[1]
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, headers=headers or {},
                                 method="GET" if body is None else "POST")
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as res:
            raw = res.read()
            return res.status, json.loads(raw) if "json" in res.headers["Content-Type"] else raw.decode()
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def ranks_best_shown_first(item):
    """Ranks (task order) that put the cards in their shown order: card 1 best, card 2 next..."""
    ranks = [0] * len(item["shown_order"])
    for position, index in enumerate(item["shown_order"]):
        ranks[index] = position + 1
    return ranks


def label(server, annotator, **extra):
    status, item = call(server, f"/api/next?annotator={annotator}")
    assert status == 200 and item["task"] is not None
    body = {"annotator": annotator, "task_id": item["task"]["id"], "ranks": ranks_best_shown_first(item),
            "shown_order": item["shown_order"], "seconds": 1.5, **extra}
    return item, call(server, "/api/label", body)


# --------------------------------------------------------------------------- bad files

@pytest.mark.parametrize("line, message", [
    ('{"id": "a", "prompt": "p", "responses": ["x"]}', "K >= 2"),
    ('{"id": "a", "prompt": "p", "responses": ["x", "y"', "malformed JSON"),
    ('{"prompt": "p", "responses": ["x", "y"]}', "'id' must be a non-empty string"),
    ('{"id": "t0", "prompt": "p", "responses": ["x", "y"]}', "repeats the one on line 1"),
    ('{"id": "b", "prompt": 3, "responses": ["x", "y"]}', "'prompt' must be a string"),
])
def test_malformed_tasks_lines_name_file_and_line(tmp_path, line, message):
    p = tmp_path / "tasks.jsonl"
    p.write_text(json.dumps(TASKS[0]) + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"{p}:3: .*{message}"):
        read_tasks(p)


@pytest.mark.parametrize("change, message", [
    ({"ranks": [1, 2]}, "list of 3 ints"),
    ({"ranks": [1, 2, 4]}, "from 1 \\(best\\) to 3"),
    ({"shown_order": [0, 0, 1]}, "permutation"),
    ({"annotator": None}, "'annotator' must be a string"),
])
def test_malformed_labels_lines_name_file_and_line(tmp_path, tasks_file, change, message):
    good = {"task_id": "t0", "annotator": "ann", "prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 2, 2]}
    labels = write_jsonl(tmp_path / "labels.jsonl", [good, {**good, "task_id": "t1", **change}])
    with pytest.raises(ValueError, match=rf"{labels}:2: .*{message}"):
        LabelStore(read_tasks(tasks_file), labels)
    labels.write_text(json.dumps(good) + "\n" + json.dumps({**good, "seconds": float("nan")}) + "\n")
    with pytest.raises(ValueError, match=rf"{labels}:2: malformed JSON \(NaN is not a JSON number"):
        read_labels(labels)
    labels.write_bytes(json.dumps(good).encode() + b'\n{"task_id": "t1\xff"}\n')
    with pytest.raises(ValueError, match=rf"{labels}:2: not valid UTF-8"):
        read_labels(labels)
    labels.write_text(json.dumps(good) + '\n{"task_id": "t1", "annot')  # killed mid-write
    with pytest.raises(ValueError, match=rf"{labels}:2: malformed JSON.*truncated last line"):
        read_labels(labels)


def test_labels_of_another_tasks_file_are_refused(tmp_path, tasks_file):
    labels = write_jsonl(tmp_path / "labels.jsonl", [{"task_id": "zz", "annotator": "a", "prompt": "p",
                                                      "responses": ["a", "b"], "ranks": [1, 2]}])
    with pytest.raises(ValueError, match="task 'zz', which is not in the tasks file"):
        LabelStore(read_tasks(tasks_file), labels)


# --------------------------------------------------------------------------- API

def test_rank_skip_refuse_and_progress(start, tmp_path):
    server = start()
    status, page = call(server, "/")
    assert status == 200 and "rlfuse label" in page
    item, (status, res) = label(server, "ann", note="close call", none_acceptable=True)
    assert status == 200 and (res["done"], res["total"]) == (1, 5)
    row = read_rows(tmp_path / "labels.jsonl")[0]  # on disk as soon as it was acknowledged
    task = TASKS[0]
    assert row["task_id"] == "t0" and row["responses"] == task["responses"] and row["prompt"] == task["prompt"]
    assert row["ranks"] == ranks_best_shown_first(item) and row["note"] == "close call" and row["none_acceptable"]
    assert row["shown_order"] == item["shown_order"] and row["seconds"] == 1.5

    # the same annotator cannot label t0 twice; bad ranks, unknown tasks and bad bodies are refused
    body = {"annotator": "ann", "task_id": "t0", "ranks": [1, 2, 3]}
    assert call(server, "/api/label", body)[0] == 409
    assert call(server, "/api/label", {**body, "task_id": "t1", "ranks": [1, 2]})[0] == 400
    assert call(server, "/api/label", {**body, "task_id": "t1", "ranks": [1, 2, 9]})[0] == 400
    assert call(server, "/api/label", {**body, "task_id": "t1", "ranks": None})[0] == 400  # not placed: no default
    assert call(server, "/api/label", {**body, "task_id": "nope"})[0] == 404
    assert call(server, "/api/label", {**body, "task_id": "t1", "annotator": " "})[0] == 400
    assert call(server, "/api/next?annotator=")[0] == 400
    assert call(server, "/api/nothing")[0] == 404

    status, item = call(server, "/api/next?annotator=ann")
    assert item["task"]["id"] == "t1"
    status, res = call(server, "/api/label", {"annotator": "ann", "task_id": "t1", "skipped": True})
    assert status == 200 and res["done"] == 2
    rows = read_rows(tmp_path / "labels.jsonl")
    assert len(rows) == 2 and rows[1]["skipped"] and rows[1]["ranks"] is None


def test_cards_are_shuffled_per_annotator_and_stable(start):
    server = start(overlap=2)
    orders = {a: [call(server, f"/api/next?annotator={a}")[1]["shown_order"] for _ in range(2)] for a in "ab"}
    assert orders["a"][0] == orders["a"][1]  # a reload shows the same order
    task = read_tasks_by_id()["t0"]
    many = {tuple(shown_order(f"person{i}", task)) for i in range(30)}
    assert len(many) > 1 and all(sorted(o) == [0, 1, 2] for o in many)


def read_tasks_by_id():
    from rlfuse.engine.label.records import Task

    return {t["id"]: Task(t["id"], t["prompt"], t["responses"]) for t in TASKS}


def test_overlap_decides_who_sees_a_task(start):
    one = start(overlap=1)
    assert call(one, "/api/next?annotator=a")[1]["task"]["id"] == "t0"
    assert call(one, "/api/next?annotator=b")[1]["task"]["id"] == "t1"  # t0 is on a's screen
    two = start(overlap=2, labels=one.store.path.parent / "labels2.jsonl")
    assert call(two, "/api/next?annotator=a")[1]["task"]["id"] == "t0"
    assert call(two, "/api/next?annotator=b")[1]["task"]["id"] == "t0"
    assert call(two, "/api/next?annotator=c")[1]["task"]["id"] == "t1"  # t0 already has two annotators


def test_token_required_beyond_localhost(start, tmp_path, tasks_file):
    server = start(token="s3cret")
    assert call(server, "/")[0] == 403
    assert call(server, "/?token=wrong")[0] == 403
    assert call(server, "/api/next?annotator=a", headers={"X-Label-Token": "wrong"})[0] == 403
    assert call(server, "/api/label", {"annotator": "a", "task_id": "t0", "ranks": [1, 2, 3]})[0] == 403
    assert call(server, "/?token=s3cret")[0] == 200
    assert call(server, "/api/next?annotator=a", headers={"X-Label-Token": "s3cret"})[0] == 200
    assert not (tmp_path / "labels.jsonl").read_text()  # the refused POST wrote nothing

    wide = make_server(tasks_file, tmp_path / "other.jsonl", host="0.0.0.0", port=0)  # beyond loopback
    try:
        assert wide.token and f"?token={wide.token}" in wide.url
    finally:
        wide.server_close()
        wide.store.close()

    local = start()  # loopback needs no token, but only answers requests addressed to localhost
    assert call(local, "/", headers={"Host": "evil.example:80"})[0] == 403


def test_concurrent_submissions_lose_and_duplicate_nothing(start, tmp_path):
    server = start(overlap=3)
    results, errors = [], []

    def browser(annotator, task_ids):
        for task_id in task_ids:
            try:
                results.append((annotator, task_id, call(server, "/api/label", {
                    "annotator": annotator, "task_id": task_id, "ranks": [1, 3, 2]})[0]))
            except Exception as exc:  # noqa: BLE001 - collected and reported below
                errors.append(exc)

    ids = [t["id"] for t in TASKS]
    # two browsers per annotator submit every task, one in file order and one reversed
    threads = [threading.Thread(target=browser, args=(a, order)) for a in ("a", "b", "c")
               for order in (ids, ids[::-1])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    accepted = sorted((a, t) for a, t, status in results if status == 200)
    assert sorted((a, t) for a, t, status in results if status == 409) == accepted  # each twin refused once
    rows = read_rows(tmp_path / "labels.jsonl")
    assert sorted((r["annotator"], r["task_id"]) for r in rows) == accepted == sorted(
        (a, t) for a in "abc" for t in ids)


def test_restart_resumes_each_annotator(start, tmp_path):
    server = start(overlap=2)
    for _ in range(2):
        label(server, "a")
    label(server, "b")
    stop(server)
    restarted = start(overlap=2)
    assert call(restarted, "/api/next?annotator=a")[1]["task"]["id"] == "t2"
    status, item = call(restarted, "/api/next?annotator=b")
    assert item["task"]["id"] == "t1" and (item["done"], item["total"]) == (1, 5)
    assert call(restarted, "/api/label", {"annotator": "a", "task_id": "t0", "ranks": [1, 2, 3]})[0] == 409
    assert len(read_rows(tmp_path / "labels.jsonl")) == 3


# --------------------------------------------------------------------------- going back (issue 25)

def test_history_reopen_and_a_revision_that_supersedes(start, tmp_path, cli):
    server = start()
    item, _ = label(server, "ann")
    call(server, "/api/label", {"annotator": "ann", "task_id": "t1", "skipped": True, "skip_reason": "unclear"})
    status, hist = call(server, "/api/history?annotator=ann")
    assert status == 200 and [(h["task_id"], h["skipped"], h["skip_reason"]) for h in hist["items"]] == [
        ("t1", True, "unclear"), ("t0", False, "")]  # newest first
    assert call(server, "/api/history?annotator=bob")[1] == {"items": []}

    status, again = call(server, "/api/task?annotator=ann&id=t0")
    assert status == 200 and again["shown_order"] == item["shown_order"]  # the same cards in the same order
    assert again["saved"]["ranks"] == ranks_best_shown_first(item) and not again["saved"]["skipped"]
    assert call(server, "/api/task?annotator=ann&id=t3")[0] == 409  # not in ann's history
    assert call(server, "/api/task?annotator=ann&id=zz")[0] == 404

    # undo the skip: rank t1 after all; and change t0's ranking
    new = {"annotator": "ann", "task_id": "t1", "ranks": [3, 2, 1], "revise": True}
    assert call(server, "/api/label", {**new, "revise": False})[0] == 409  # a revision says it is one
    status, res = call(server, "/api/label", new)
    assert status == 200 and res["done"] == 2  # progress counts tasks, not labels
    assert call(server, "/api/label", {**new, "task_id": "t0", "ranks": [1, 1, 2]})[0] == 200
    assert call(server, "/api/label", {**new, "task_id": "t2"})[0] == 409  # nothing to revise
    assert call(server, "/api/label", {**new, "skip_reason": "x"})[0] == 400  # a reason only for a skip

    rows = read_rows(tmp_path / "labels.jsonl")
    assert [(r["task_id"], r["revision"]) for r in rows] == [("t0", 0), ("t1", 0), ("t1", 1), ("t0", 1)]
    assert [h["task_id"] for h in call(server, "/api/history?annotator=ann")[1]["items"]] == ["t0", "t1"]
    stop(server)
    restarted = start()  # the store reads the latest label back
    assert call(restarted, "/api/task?annotator=ann&id=t1")[1]["saved"]["ranks"] == [3, 2, 1]
    assert call(restarted, "/api/next?annotator=ann")[1]["task"]["id"] == "t2"

    out = tmp_path / "rankings.jsonl"
    code, stdout, err = cli("label", "export", tmp_path / "labels.jsonl", "--format", "rankings", "--out", out)
    assert code == 0 and json.loads(stdout)["superseded"] == 2, err
    assert [(r["task_id"], r["ranks"]) for r in read_rows(out)] == [("t1", [3, 2, 1]), ("t0", [1, 1, 2])]
    code, stdout, err = cli("label", "stats", tmp_path / "labels.jsonl", "--json")
    stats = json.loads(stdout)
    assert (stats["labels"], stats["superseded"], stats["per_annotator"]["ann"]["skipped"]) == (2, 2, 0)


def test_a_ranking_revised_into_a_skip_frees_the_overlap_slot(start):
    server = start(overlap=1)
    label(server, "a")  # a ranks t0
    assert call(server, "/api/label", {"annotator": "a", "task_id": "t0", "skipped": True, "revise": True})[0] == 200
    assert call(server, "/api/next?annotator=b")[1]["task"]["id"] == "t0"  # a's skip freed t0 for b


def test_guidelines_go_out_with_each_task_and_their_hash_into_each_label(tmp_path, cli):
    guide = tmp_path / "guide.md"
    guide.write_text("# Better means\n\n- **correct** first\n")
    tasks = write_jsonl(tmp_path / "tasks.jsonl", [{**TASKS[0], "guidelines": "Exact numbers only."}, TASKS[1]])
    with server_threads() as run:
        server = run(tasks, tmp_path / "labels.jsonl", guidelines=guide)
        first = call(server, "/api/next?annotator=ann")[1]["task"]
        assert first["guidelines"] == guide.read_text() + "\n\nExact numbers only."  # the file's, then the task's
        digest = hashlib.sha256(first["guidelines"].encode()).hexdigest()
        assert first["guidelines_sha256"] == digest
        body = {"annotator": "ann", "task_id": "t0", "ranks": [1, 2, 3]}
        assert call(server, "/api/label", {**body, "guidelines_sha256": "0" * 64})[0] == 409  # an older page
        assert call(server, "/api/label", {**body, "guidelines_sha256": digest})[0] == 200
        second = call(server, "/api/next?annotator=ann")[1]["task"]
        assert second["guidelines"] == guide.read_text()
        assert call(server, "/api/label", {**body, "task_id": "t1"})[0] == 200  # no hash sent: the current one
    rows = read_rows(tmp_path / "labels.jsonl")
    assert rows[0]["guidelines_sha256"] == digest
    assert rows[1]["guidelines_sha256"] == hashlib.sha256(guide.read_bytes()).hexdigest()
    code, _, err = cli("label", "serve", tasks, "--labels", tmp_path / "l.jsonl", "--guidelines", tmp_path / "no.md")
    assert code == 2 and "--guidelines" in err and "no.md" in err and "file not found" in err, err
