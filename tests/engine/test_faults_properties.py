"""Issue 21, property tests: random damage to what a run reads back, and random text fields.

* ``test_resume_after_random_damage`` (60 cases): one file of a finished run (the ``latest``
  pointer, a checkpoint's files, the saved configs, metrics.jsonl, summary.json) is truncated,
  has bytes flipped, is replaced by random bytes or by JSON of the wrong shape, or has garbage
  appended; ``--resume`` then either continues (exit 0, the steps logged once each) or stops
  with one line (exit 2), never a traceback.
* ``test_data_text_fields`` (200 cases): random text, lone surrogates included, in a data line is
  read back unchanged or refused with file:line.
* ``test_label_note_and_name`` (200 cases): the same text as a label's note and annotator is stored
  and read back unchanged, or refused with a 400; the labels file always parses afterwards.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
import tempfile
from pathlib import Path

import pytest
from engine_helpers import FAST, read_rows, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlfuse.engine.cli import main
from rlfuse.engine.data import read_jsonl
from rlfuse.engine.label.records import read_labels, read_tasks
from rlfuse.engine.label.store import LabelError, LabelStore

DAMAGE_CASES = 60
TEXT_CASES = 200
QUIET = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]


def run_cli(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


# --------------------------------------------------------------------------- damage to a finished run

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("damage")
    data = write_jsonl(d / "sft.jsonl", [{"prompt": f"say {w}", "response": f"{w} {w}"}
                                         for w in ("red", "blue", "green", "cat", "dog", "sun")])
    run = d / "run"
    code, _, err = run_cli("sft", "--data", data, "--run-dir", run, *FAST, "--set", "save_every=2",
                           "--max-steps", 4)
    assert code == 0, err
    return data, run


DAMAGED_FILES = ["sft/latest", "sft/ckpt-0000004/adapter_model.safetensors", "sft/ckpt-0000004/adapter_config.json",
                 "sft/ckpt-0000004/trainer_state.pt", "sft/ckpt-0000002/trainer_state.pt", "sft/config.yaml",
                 "config.yaml", "metrics.jsonl", "summary.json"]


@st.composite
def damage(draw):
    kind = draw(st.sampled_from(["truncate", "flip", "replace", "append", "empty", "json"]))
    other_json = draw(st.sampled_from([b"[1, 2]", b"null", b"3", b'"x"', b"{}", b"{\"a\": [}"]))
    seed = draw(st.integers(0, 2**32 - 1))
    frac = draw(st.floats(0, 1))

    def apply(raw: bytes) -> bytes:
        rng = random.Random(seed)
        if kind == "truncate":
            return raw[: int(len(raw) * frac)]
        if kind == "empty":
            return b""
        if kind == "json":  # well-formed text of the wrong shape (or almost JSON)
            return other_json + b"\n"
        if kind == "replace":
            return bytes(rng.randrange(256) for _ in range(max(1, int(64 * frac))))
        if kind == "append":
            return raw + bytes(rng.randrange(256) for _ in range(1 + int(32 * frac)))
        out = bytearray(raw)
        for _ in range(1 + int(8 * frac)):
            if out:
                out[rng.randrange(len(out))] = rng.randrange(256)
        return bytes(out)

    apply.kind = kind
    return apply


@settings(max_examples=DAMAGE_CASES, deadline=None, suppress_health_check=QUIET)
@given(name=st.sampled_from(DAMAGED_FILES), hurt=damage())
def test_resume_after_random_damage(finished_run, name, hurt):
    data, run = finished_run
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "run"
        shutil.copytree(run, copy)
        path = copy / name
        path.write_bytes(hurt(path.read_bytes()))
        code, out, err = run_cli("sft", "--data", data, "--run-dir", copy, *FAST, "--set", "save_every=2",
                                 "--max-steps", 5, "--resume")
        assert "Traceback" not in err
        if code == 0:
            steps = [r["step"] for r in read_rows(copy / "metrics.jsonl") if r.get("stage") == "sft"]
            assert steps == sorted(set(steps)) and steps[-1] == 5, (name, hurt.kind, steps)
        else:
            assert code == 2, (name, hurt.kind, err)
            lines = [ln for ln in err.strip().splitlines() if ln.strip()]
            assert len(lines) == 1 and lines[0].startswith("rlfuse: error: "), (name, hurt.kind, err)


# --------------------------------------------------------------------------- random text fields

TEXT = st.text(alphabet=st.one_of(st.characters(), st.sampled_from(["\ud83d", "\ude00", "\udfff", "\ud800"])),
               max_size=12)


def _has_lone_surrogate(s: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in s)


@settings(max_examples=TEXT_CASES, deadline=None, suppress_health_check=QUIET)
@given(prompt=TEXT, response=TEXT)
def test_data_text_fields(tmp_path, prompt, response):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "first", "response": "line"}) + "\n"
                    + json.dumps({"prompt": prompt, "response": response}) + "\n")
    bad = _has_lone_surrogate(prompt) or _has_lone_surrogate(response)
    try:
        rows = read_jsonl(path)
    except ValueError as exc:
        assert bad and str(exc).startswith(f"{path}:2: ") and "lone surrogate" in str(exc), str(exc)
        return
    assert not bad and rows[1] == (2, {"prompt": prompt, "response": response})


@pytest.fixture
def store_files(tmp_path):
    tasks = write_jsonl(tmp_path / "tasks.jsonl", [{"id": f"t{i}", "prompt": "q", "responses": ["a", "b"]}
                                                   for i in range(2)])
    return read_tasks(tasks), tmp_path / "labels.jsonl"


@settings(max_examples=TEXT_CASES, deadline=None, suppress_health_check=QUIET)
@given(note=TEXT, name=TEXT)
def test_label_note_and_name(store_files, note, name):
    tasks, labels = store_files
    labels.unlink(missing_ok=True)
    store = LabelStore(tasks, labels)
    try:
        store.submit(name, "t0", ranks=[1, 2], order=[0, 1], note=note)
        stored = True
    except LabelError as exc:
        stored = False
        assert exc.status == 400, str(exc)
        assert _has_lone_surrogate(note) or _has_lone_surrogate(name) or not name.strip() or len(name.strip()) > 64
    finally:
        store.close()
    got = read_labels(labels, missing_ok=True)  # the file always parses
    if stored:
        assert [(lb.annotator, lb.note) for lb in got] == [(name.strip(), note)]
    else:
        assert got == []
