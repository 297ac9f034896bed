"""End to end in headless Chromium: rank by keyboard (and mouse), kill the server with SIGKILL,
restart it, finish, and check the exported pairs.

Needs Debian's chromium (``apt-get install chromium`` -> /usr/bin/chromium, or RLFUSE_CHROMIUM)
and the ``playwright`` Python package (never ``playwright install``: no browser download).
Skips with the reason when either is missing. The page's finer behaviour (layout, markdown,
guidelines, history, keys and screen readers) is tested in test_label_page.py.
"""

from __future__ import annotations

from engine_helpers import read_rows, write_jsonl
from label_helpers import free_port, launch, shown_texts, start_server, sync_playwright_or_skip

TASKS = [
    {"id": "q1", "prompt": "What's 4-2 and 3-1?",
     "responses": ["4-2 = 2 and 3-1 = 2.", "4-2 = 2 and 3-1 = 3.", "Why did the two cross the road?"]},
    {"id": "q2", "prompt": "What's 9+8?", "responses": ["17", "9+8 = 17.", "18"]},
    {"id": "q3", "prompt": "say sun", "responses": ["sun", "moon", "tree"]},
]


def press_card(page, text: str) -> None:
    page.keyboard.press(str(shown_texts(page).index(text) + 1))


def test_rank_by_keyboard_survive_a_kill_and_export(tmp_path, cli):
    sync_playwright = sync_playwright_or_skip()
    from playwright.sync_api import expect

    tasks, labels = write_jsonl(tmp_path / "tasks.jsonl", TASKS), tmp_path / "labels.jsonl"
    port = free_port()
    server = start_server(tasks, labels, port)
    try:
        with sync_playwright() as pw:
            browser = launch(pw)
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
