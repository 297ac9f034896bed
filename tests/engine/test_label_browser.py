"""End to end in headless Chromium: rank by keyboard (and mouse), kill the server with SIGKILL,
restart it, finish, and check the exported pairs.

Needs Debian's chromium (``apt-get install chromium`` -> /usr/bin/chromium, or RLFUSE_CHROMIUM)
and the ``playwright`` Python package (never ``playwright install``: no browser download).
Skips with the reason when either is missing. With RLFUSE_LABEL_SCREENSHOT=path.png it also
saves a screenshot of the page (README's docs/label.png).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from engine_helpers import read_rows, write_jsonl

CHROMIUM = os.environ.get("RLFUSE_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

TASKS = [
    {"id": "q1", "prompt": "What's 4-2 and 3-1?",
     "responses": ["4-2 = 2 and 3-1 = 2.", "4-2 = 2 and 3-1 = 3.", "Why did the two cross the road?"]},
    {"id": "q2", "prompt": "What's 9+8?", "responses": ["17", "9+8 = 17.", "18"]},
    {"id": "q3", "prompt": "say sun", "responses": ["sun", "moon", "tree"]},
]


def _sync_playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright Python package is not installed (pip install playwright; "
                    "the browser is Debian's chromium, never `playwright install`)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or set RLFUSE_CHROMIUM)")
    return sync_playwright


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tasks: Path, labels: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "rlfuse.engine.cli", "label", "serve", str(tasks),
                             "--labels", str(labels), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://localhost:{port}/", timeout=2):
                return proc
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(f"label server exited: {proc.stdout.read()}") from None
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("label server did not start within 30 s")


def shown_texts(page) -> list[str]:
    return page.eval_on_selector_all(".card > div", "els => els.map(e => e.textContent)")


def press_card(page, text: str) -> None:
    page.keyboard.press(str(shown_texts(page).index(text) + 1))


def test_rank_by_keyboard_survive_a_kill_and_export(tmp_path, cli):
    sync_playwright = _sync_playwright()
    from playwright.sync_api import expect

    tasks, labels = write_jsonl(tmp_path / "tasks.jsonl", TASKS), tmp_path / "labels.jsonl"
    port = _free_port()
    server = start_server(tasks, labels, port)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.goto(f"http://localhost:{port}/?annotator=alice")
            expect(page.locator("#progress")).to_have_text("0 / 3 done")
            expect(page.locator("#prompt")).to_have_text("What's 4-2 and 3-1?")

            # q1: best, then a wrong second choice undone with Backspace, then the right order
            right, near, joke = TASKS[0]["responses"]
            press_card(page, right)
            press_card(page, joke)
            page.keyboard.press("Backspace")
            press_card(page, near)
            page.keyboard.press("Enter")  # not every card is placed: nothing is sent
            expect(page.locator("#message")).to_contain_text("place every card first")
            assert not labels.exists() or not labels.read_text()
            expect(page.locator("#submit")).to_be_disabled()
            press_card(page, joke)
            expect(page.locator("#submit")).to_be_enabled()
            if shot := os.environ.get("RLFUSE_LABEL_SCREENSHOT"):
                page.locator("#note").fill("the second one slips on 3-1")
                page.set_viewport_size({"width": 1100, "height": 400})
                page.screenshot(path=shot)
                page.locator("#note").fill("")
                page.keyboard.press("Escape")  # leave the note: keys rank again
            page.keyboard.press("Enter")
            expect(page.locator("#progress")).to_have_text("1 / 3 done")

            # q2: "17" and "9+8 = 17." tie (= before the number), "18" last
            expect(page.locator("#prompt")).to_have_text("What's 9+8?")
            press_card(page, "17")
            page.keyboard.press("=")
            press_card(page, "9+8 = 17.")
            press_card(page, "18")
            expect(page.locator("#ranking")).to_contain_text(" = ")
            page.keyboard.press("Enter")
            expect(page.locator("#progress")).to_have_text("2 / 3 done")
            assert len(read_rows(labels)) == 2

            server.kill()  # SIGKILL: no chance to flush anything it had not already written
            server.wait(timeout=10)
            assert len(read_rows(labels)) == 2
            server = start_server(tasks, labels, port)

            page.reload()  # alice resumes at q3, her progress intact
            expect(page.locator("#progress")).to_have_text("2 / 3 done")
            expect(page.locator("#prompt")).to_have_text("say sun")
            for text in ("moon", "sun", "tree"):  # the mouse works too
                page.locator(".card", has_text=text).click()
            page.locator("#none").check()
            page.locator("#submit").click()
            expect(page.locator("#finished")).to_be_visible()
            expect(page.locator("#progress")).to_have_text("3 / 3 done")
            browser.close()
    finally:
        server.kill()
        server.wait(timeout=10)

    rows = read_rows(labels)
    assert [r["task_id"] for r in rows] == ["q1", "q2", "q3"] and rows[2]["none_acceptable"]
    assert [r["ranks"] for r in rows] == [[1, 2, 3], [1, 1, 2], [2, 1, 3]]
    out = tmp_path / "pairs.jsonl"
    assert cli("label", "export", labels, "--format", "pairs", "--out", out)[0] == 0
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in read_rows(out)] == [
        ("What's 4-2 and 3-1?", right, near), ("What's 4-2 and 3-1?", right, joke),
        ("What's 4-2 and 3-1?", near, joke),
        ("What's 9+8?", "17", "18"), ("What's 9+8?", "9+8 = 17.", "18"),  # the tied pair is dropped
        ("say sun", "moon", "sun"), ("say sun", "moon", "tree"), ("say sun", "sun", "tree")]
