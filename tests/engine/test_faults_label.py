"""Issue 21, label-store group: the labels file cannot be corrupted, and every refusal of
``rlfuse label ...`` is one line (exit 2), never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from engine_helpers import read_rows, write_jsonl, one_line_error

from rlfuse.engine.label.records import read_labels
from rlfuse.engine.label.server import make_server, serve_in_thread
from rlfuse.engine.label.store import LabelStore

TASKS = [{"id": f"t{i}", "prompt": f"q{i}", "responses": ["a", "b"]} for i in range(3)]


def _label(task_id, annotator="ann", ranks=(1, 2)):
    return {"task_id": task_id, "annotator": annotator, "prompt": "q", "responses": ["a", "b"],
            "ranks": list(ranks), "skipped": False, "shown_order": [0, 1], "seconds": 1.0}


@pytest.fixture
def tasks(tmp_path):
    from rlfuse.engine.label.records import read_tasks

    return read_tasks(write_jsonl(tmp_path / "tasks.jsonl", TASKS))


# --------------------------------------------------------------------------- the labels file

def test_missing_final_newline_is_repaired_before_appending(tmp_path, tasks):
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps(_label("t0")))  # a complete record, no newline (an editor, a copy)
    store = LabelStore(tasks, path)
    store.submit("bob", "t1", ranks=[2, 1], order=[0, 1])
    store.close()
    assert path.read_bytes().endswith(b"\n")
    got = read_labels(path)  # parses: the new label is on its own line
    assert [(lb.task_id, lb.annotator) for lb in got] == [("t0", "ann"), ("t1", "bob")]
    LabelStore(tasks, path).close()  # and the server starts on it again


def test_intact_file_is_left_alone(tmp_path, tasks):
    path = write_jsonl(tmp_path / "labels.jsonl", [_label("t0")])
    before = path.read_bytes()
    LabelStore(tasks, path).close()
    assert path.read_bytes() == before


def test_unparsable_line_refuses_to_start_naming_it(tmp_path, tasks, cli):
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps(_label("t0")) + "\n" + '{"task_id": "t1", "annot')  # killed mid-write
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"labels.jsonl:2: malformed JSON.*truncated last line"):
        LabelStore(tasks, path)
    assert path.read_bytes() == before  # nothing appended on top of it
    code, _, err = cli("label", "serve", tmp_path / "tasks.jsonl", "--labels", path, "--port", "0")
    one_line_error(code, err, "labels.jsonl:2")
    assert path.read_bytes() == before


# --------------------------------------------------------------------------- the CLI's refusals

def test_trl_style_without_format_trl(tmp_path, cli):
    labels = write_jsonl(tmp_path / "labels.jsonl", [_label("t0")])
    code, _, err = cli("label", "export", labels, "--format", "pairs", "--trl-style", "standard",
                       "--out", tmp_path / "o.jsonl")
    one_line_error(code, err, "--trl-style is for --format trl")


@pytest.mark.parametrize("content, message", [(b"\xff\xfe rank", "not valid UTF-8"), (b"  \n", "empty")])
def test_guidelines_file_unreadable(tmp_path, cli, content, message):
    write_jsonl(tmp_path / "tasks.jsonl", TASKS)
    (tmp_path / "g.md").write_bytes(content)
    code, _, err = cli("label", "serve", tmp_path / "tasks.jsonl", "--labels", tmp_path / "l.jsonl",
                       "--guidelines", tmp_path / "g.md", "--port", "0")
    one_line_error(code, err, "--guidelines", "g.md", message)
    assert not (tmp_path / "l.jsonl").exists()  # refused before the store opened the file


def test_export_out_existing_directory(tmp_path, cli):
    labels = write_jsonl(tmp_path / "labels.jsonl", [_label("t0")])
    (tmp_path / "outdir").mkdir()
    code, _, err = cli("label", "export", labels, "--format", "pairs", "--out", tmp_path / "outdir")
    one_line_error(code, err, "is a directory", "outdir")


def test_export_out_below_a_file(tmp_path, cli):
    labels = write_jsonl(tmp_path / "labels.jsonl", [_label("t0")])
    (tmp_path / "afile").write_text("x")
    code, _, err = cli("label", "export", labels, "--format", "pairs", "--out", tmp_path / "afile" / "o.jsonl")
    one_line_error(code, err, "afile")


@pytest.mark.parametrize("port", ["99999", "-1", "65536"])
def test_serve_port_out_of_range(tmp_path, cli, port):
    write_jsonl(tmp_path / "tasks.jsonl", TASKS)
    code, _, err = cli("label", "serve", tmp_path / "tasks.jsonl", "--labels", tmp_path / "l.jsonl", "--port", port)
    one_line_error(code, err, "--port", "65535")
    assert not (tmp_path / "l.jsonl").exists()  # refused before the store opened the file


def test_stats_into_a_closed_pipe(tmp_path):
    """`rlfuse label stats | head -n 1`: no traceback, no 'Exception ignored' at exit."""
    # a table longer than a pipe's buffer (64 KiB), so the write after head exits fails
    rows = [_label(f"t{i}", annotator=f"annotator-{i:04d}") for i in range(1200)]
    labels = write_jsonl(tmp_path / "labels.jsonl", rows)
    cmd = f"{sys.executable} -m rlfuse.engine.cli label stats {labels} | head -n 1"
    res = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert res.stdout.startswith("1200 labels"), res.stdout[:200]
    assert res.stderr == "", res.stderr
    assert res.returncode in (0, 141)  # 141: like any command whose reader went away


# --------------------------------------------------------------------------- lone surrogates

def _post(server, body: bytes):
    port = server.server_address[1]
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/label", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_lone_surrogate_in_note_is_http_400(tmp_path):
    labels = tmp_path / "labels.jsonl"
    server = make_server(write_jsonl(tmp_path / "tasks.jsonl", TASKS), labels, port=0)
    serve_in_thread(server)
    try:
        good = {"annotator": "ann", "task_id": "t0", "ranks": [1, 2], "shown_order": [0, 1]}
        for field, value in (("note", "nice \ud83d"), ("annotator", "x\udc00y")):
            body = json.dumps({**good, field: value}).encode()  # json escapes it as \ud83d
            status, answer = _post(server, body)
            assert status == 400, answer
            assert "lone surrogate" in answer["error"]
        # a task id holding one is answered too (404, the message escaped), not a dropped connection
        status, answer = _post(server, json.dumps({**good, "task_id": "t\ud83d"}).encode())
        assert status == 404 and "unknown task id" in answer["error"]
        skip = {"annotator": "ann", "task_id": "t0", "skipped": True, "skip_reason": "odd \udc00"}
        status, answer = _post(server, json.dumps(skip).encode())
        assert status == 400 and "skip_reason" in answer["error"], answer
        status, answer = _post(server, json.dumps({**good, "note": "fine \U0001F600"}).encode())
        assert status == 200, answer
    finally:
        server.shutdown()
        server.server_close()
        server.store.close()
    rows = read_rows(labels)
    assert len(rows) == 1 and rows[0]["note"] == "fine \U0001F600"


def test_lone_surrogate_in_tasks_file_names_the_line(tmp_path, cli):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps(TASKS[0]) + "\n" + json.dumps({**TASKS[1], "prompt": "half \ud83d"}) + "\n")
    code, _, err = cli("label", "serve", tasks, "--labels", tmp_path / "l.jsonl", "--port", "0")
    one_line_error(code, err, "tasks.jsonl:2", "lone surrogate", "prompt")


def test_lone_surrogate_in_labels_file_names_the_line(tmp_path, cli):
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({**_label("t0"), "note": "\udc80"}) + "\n")
    code, _, err = cli("label", "stats", labels)
    one_line_error(code, err, "labels.jsonl:1", "lone surrogate", "note")

