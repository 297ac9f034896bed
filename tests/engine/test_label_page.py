"""The labelling page as annotators use it, in headless Chromium (issue 25): long items,
keys after a mouse click, layout, guidelines, going back, keyboard and screen readers.

The page is served by a server thread on a free port; one browser serves the module.
Skips with the reason where playwright or Debian's chromium is missing (see label_browser).
"""

from __future__ import annotations

import hashlib
import os

import pytest
from engine_helpers import read_rows, write_jsonl
from label_helpers import launch, server_threads, shown_texts, stop_server as stop, sync_playwright_or_skip

TOKEN = "sha256:" + "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08" * 5
URL = "https://example.com/" + "a-very-long-path-segment/" * 12 + "?q=" + "x" * 120
THREE = [{"id": f"q{i}", "prompt": f"question {i}", "responses": [f"answer {i}a", f"answer {i}b", f"answer {i}c"]}
         for i in range(3)]


@pytest.fixture(scope="module")
def browser():
    sync_playwright = sync_playwright_or_skip()
    with sync_playwright() as pw:
        b = launch(pw)
        yield b
        b.close()


@pytest.fixture
def serve(tmp_path):
    with server_threads() as run:
        yield lambda tasks, **kw: run(write_jsonl(tmp_path / "tasks.jsonl", tasks), tmp_path / "labels.jsonl", **kw)


@pytest.fixture
def open_page(browser):
    pages = []

    def run(server, annotator="alice", width=1100, height=760):
        page = browser.new_page(viewport={"width": width, "height": height})
        pages.append(page)
        page.goto(f"http://localhost:{server.server_address[1]}/?annotator={annotator}")
        page.wait_for_selector(".card")
        return page

    yield run
    for page in pages:
        page.close()


def placed(page) -> int:
    return page.locator(".card.placed").count()


# --------------------------------------------------------------------------- the three failures

def test_a_long_unbroken_token_stays_inside_its_card(serve, open_page):
    server = serve([{"id": "long", "prompt": "Give the checksum and the link.",
                     "responses": [TOKEN, URL, "short", "also short"]}])
    page = open_page(server)
    overflow = page.evaluate("""() => ({
        page: document.scrollingElement.scrollWidth - innerWidth,
        cards: [...document.querySelectorAll('.card')].map(c => Math.max(
            c.scrollWidth - c.clientWidth, c.getBoundingClientRect().right - innerWidth)) })""")
    assert overflow["page"] <= 0, "the page scrolls sideways"
    assert max(overflow["cards"]) <= 0, f"text runs out of its card by {overflow['cards']} px"


def test_space_after_a_click_on_skip_or_undo_does_nothing(serve, open_page, tmp_path):
    server = serve(THREE)
    page = open_page(server)
    page.locator("#skip").click()
    page.keyboard.press("Enter")  # this page asks for a reason first: Enter skips without one
    page.locator("#prompt", has_text="question 1").wait_for()  # the next item is on screen
    page.keyboard.press(" ")  # the browser's key to scroll, not to skip again
    page.wait_for_timeout(400)
    assert len(read_rows(tmp_path / "labels.jsonl")) == 1, "Space skipped the next item too"
    assert page.locator("#progress").text_content() == "1 / 3 done"

    page.keyboard.press("1")
    page.keyboard.press("2")
    page.locator("#undo").click()
    assert placed(page) == 1
    page.keyboard.press(" ")
    page.wait_for_timeout(200)
    assert placed(page) == 1, "Space undid another card"


# --------------------------------------------------------------------------- layout for real items

LONG_PROMPT = "\n".join(f"Line {i} of a long pasted context." for i in range(300)) + "\n\nNow: which answer is right?"
TUTOR = {"id": "py", "system": "You are a concise Python tutor.",
         "prompt": "How do I reverse a list in Python? Show code and explain `reversed()` against slicing.",
         "responses": [
             "Use slicing:\n\n```python\nxs = [1, 2, 3]\nys = xs[::-1]  # a new list; xs is unchanged, and this "
             "comment runs on long enough to need its own scroll bar inside the block\n```\n\n"
             "`reversed(xs)` returns an **iterator**, not a list.",
             "Call `xs.reverse()`: it reverses *in place* and returns `None`.",
             "1. `xs[::-1]` copies\n2. `list(reversed(xs))` copies too\n3. `xs.reverse()` changes `xs`\n\n"
             "Checksum of the answer: " + TOKEN,
             "<b>I don't know</b> <img src=x onerror=\"window.__pwned = 1\"><script>window.__pwned = 2</script> "
             "[click me](javascript:window.__pwned=3) and [the docs](https://docs.python.org/3/)"]}


def in_view(page, selector) -> bool:
    return page.evaluate("""s => { const r = document.querySelector(s).getBoundingClientRect();
        return r.height > 0 && r.top >= 0 && r.bottom <= innerHeight; }""", selector)


@pytest.mark.parametrize("width", [1100, 800])
def test_a_long_prompt_keeps_the_cards_and_a_failed_save_in_view(serve, open_page, width):
    server = serve([{"id": "long", "prompt": LONG_PROMPT, "responses": ["yes", "no", "maybe"]}])
    page = open_page(server, width=width, height=760)
    first_card = page.evaluate("document.querySelector('.card').getBoundingClientRect().top")
    assert 0 < first_card < 760 - 150, f"the first card starts {first_card} px down"
    assert page.evaluate("(e => e.scrollHeight > e.clientHeight)(document.querySelector('#context'))")  # scrolls itself
    for key in "123":
        page.keyboard.press(key)
    page.evaluate("window.scrollTo(0, 0)")
    stop(server)  # the server goes away before Enter
    page.keyboard.press("Enter")
    page.locator("#message", has_text="not saved").wait_for()
    assert in_view(page, "#message") and in_view(page, "#ranking"), "the error is off screen"


def test_markdown_is_rendered_safely_code_scrolls_and_raw_text_is_a_key_away(serve, open_page, tmp_path):
    guide = tmp_path / "guide.md"
    guide.write_text("Rank by **correctness** first, then helpfulness, then brevity. Code must run as shown.")
    server = serve([TUTOR], guidelines=guide)
    page = open_page(server, width=1280, height=800)
    cards = page.locator("#cards")
    assert page.evaluate("window.__pwned") is None  # no handler, no script ran
    assert cards.locator("img, script, b").count() == 0
    assert "<img src=x" in cards.text_content()  # the HTML is shown as text
    assert cards.locator("a").count() == 1  # only the https link is a link
    assert cards.locator("a").get_attribute("href") == "https://docs.python.org/3/"
    assert cards.locator("strong", has_text="iterator").count() == 1 and cards.locator("li").count() == 3
    assert page.locator("#prompt code", has_text="reversed()").count() == 1
    pre = page.evaluate("""() => { const p = document.querySelector('#cards pre'), c = p.closest('.card');
        return { scrolls: p.scrollWidth > p.clientWidth, font: getComputedStyle(p.querySelector('code')).fontFamily,
                 inside: p.getBoundingClientRect().right <= c.getBoundingClientRect().right }; }""")
    assert pre["scrolls"] and pre["inside"] and "mono" in pre["font"].lower(), pre
    assert page.evaluate("document.scrollingElement.scrollWidth <= innerWidth")
    grid = page.evaluate("getComputedStyle(document.querySelector('#cards')).gridTemplateColumns.split(' ').length")
    assert grid == 1  # wide: one column of cards beside the prompt
    for key in "13":
        page.keyboard.press(key)
    if shot := os.environ.get("RLFUSE_LABEL_SCREENSHOT"):  # README's picture: docs/images/label-page.png
        page.locator("#note").fill("3 is right but long-winded")
        page.keyboard.press("Escape")
        page.screenshot(path=shot)

    page.keyboard.press("r")
    assert page.locator("#raw").get_attribute("aria-pressed") == "true"
    assert "**iterator**" in cards.text_content() and cards.locator("strong, pre").count() == 0
    page.reload()
    page.wait_for_selector(".card")
    assert "**iterator**" in cards.text_content()  # the choice is remembered
    page.keyboard.press("r")
    assert cards.locator("strong", has_text="iterator").count() == 1


def test_markdown_blocks_and_a_second_tab(serve, open_page, browser):
    text = "# Plan\n\n> quoted *advice*\n\n- step one\n  - a detail\n- step two\n\n2. second\n3. third\n\n---\nend"
    server = serve([{"id": "md", "prompt": "p", "responses": [text, "plain"]}, THREE[0]])
    page = open_page(server)
    card = page.locator(".card", has_text="Plan")
    assert card.locator("[role=heading]").text_content() == "Plan"
    assert card.locator("blockquote em").text_content() == "advice"
    assert card.locator("ul ul li").text_content() == "a detail" and card.locator("ul > li").count() == 3
    assert card.locator("ol").get_attribute("start") == "2" and card.locator("hr").count() == 1
    other = open_page(server)  # the same annotator in a second tab labels the item first
    for p in (other, page):
        p.keyboard.press("1")
        p.keyboard.press("2")
        p.keyboard.press("Enter")
    page.locator("#prompt", has_text="question 0").wait_for()  # refused as a duplicate, then moved on
    assert "already labelled" in page.locator("#message").text_content()


def test_cards_are_laid_out_for_k(serve, open_page):
    server = serve([{"id": "k4", "prompt": "p", "responses": ["a", "b", "c", "d"]}])
    page = open_page(server, width=960)
    tops = page.evaluate("[...document.querySelectorAll('.card')].map(c => c.offsetTop)")
    assert sorted(tops.count(t) for t in set(tops)) == [2, 2]  # K=4 on a middle-sized screen: 2 + 2, not 3 + 1


# --------------------------------------------------------------------------- guidelines

def test_guidelines_are_shown_collapsible_and_recorded_by_hash(serve, open_page, tmp_path):
    guide = tmp_path / "guide.md"
    guide.write_text("Rank by **correctness** first.\n\n- A wrong answer is worse than a refusal.\n")
    server = serve([{**THREE[0], "guidelines": "Here: exact numbers only."}, THREE[1]], guidelines=guide)
    page = open_page(server)
    box = page.locator("#guidelines")
    assert box.evaluate("d => d.open") and box.locator("strong", has_text="correctness").count() == 1
    assert "exact numbers only" in box.text_content()
    page.locator("#guidelines summary").click()  # read: collapse them
    assert not box.evaluate("d => d.open")
    page.reload()
    page.wait_for_selector(".card")
    assert not box.evaluate("d => d.open")  # stays collapsed for this version
    page.locator("#show-guidelines").click()  # the header link opens them again
    assert box.evaluate("d => d.open")
    page.keyboard.press("g")
    assert not box.evaluate("d => d.open")
    for key in "123":
        page.keyboard.press(key)
    page.keyboard.press("Enter")
    page.locator("#prompt", has_text="question 1").wait_for()
    assert box.evaluate("d => d.open")  # another version of the guidelines: open until read
    row = read_rows(tmp_path / "labels.jsonl")[0]
    shown = guide.read_text() + "\n\nHere: exact numbers only."
    assert row["guidelines_sha256"] == hashlib.sha256(shown.encode()).hexdigest()


# --------------------------------------------------------------------------- going back

def test_history_review_change_skip_with_a_reason_and_undo_the_skip(serve, open_page, tmp_path, cli):
    server = serve(THREE)
    page = open_page(server)
    page.keyboard.press("s")
    assert page.locator("#skip-ask").is_visible()
    page.keyboard.press("Escape")  # changed my mind: nothing is sent
    assert page.locator("#skip-ask").is_hidden() and not (tmp_path / "labels.jsonl").read_text()
    first = shown_texts(page)
    for key in "123":
        page.keyboard.press(key)
    page.keyboard.press("Enter")
    page.locator("#prompt", has_text="question 1").wait_for()
    page.keyboard.press("s")
    page.keyboard.press("1")  # one key: the reason
    page.locator("#prompt", has_text="question 2").wait_for()
    rows = read_rows(tmp_path / "labels.jsonl")
    assert rows[1]["skipped"] and rows[1]["skip_reason"] == "the prompt is unclear"

    page.keyboard.press("h")
    items = page.locator("#history-list li")
    items.first.wait_for()
    assert items.count() == 2 and "skipped: the prompt is unclear" in items.first.text_content()
    items.nth(1).get_by_role("button").click()  # review q0
    page.locator("#prompt", has_text="question 0").wait_for()
    assert page.locator("#revising").is_visible() and placed(page) == 3  # the saved ranking
    assert shown_texts(page) == first
    for _ in range(3):
        page.keyboard.press("Backspace")
    for key in "321":
        page.keyboard.press(key)
    page.keyboard.press("Enter")
    page.locator("#prompt", has_text="question 2").wait_for()  # back to the queue

    page.keyboard.press("h")
    page.locator("#history-list li", has_text="question 1").get_by_role("button", name="Undo skip").click()
    page.locator("#prompt", has_text="question 1").wait_for()
    assert "skipped" in page.locator("#revising").text_content() and placed(page) == 0
    for key in "213":
        page.keyboard.press(key)
    page.keyboard.press("Enter")
    page.locator("#prompt", has_text="question 2").wait_for()

    rows = read_rows(tmp_path / "labels.jsonl")
    assert [(r["task_id"], r["skipped"], r["revision"]) for r in rows] == [
        ("q0", False, 0), ("q1", True, 0), ("q0", False, 1), ("q1", False, 1)]
    assert page.locator("#progress").text_content() == "2 / 3 done"
    out = tmp_path / "rankings.jsonl"
    assert cli("label", "export", tmp_path / "labels.jsonl", "--format", "rankings", "--out", out)[0] == 0
    assert [(r["task_id"], r["ranks"]) for r in read_rows(out)] == [("q0", rows[2]["ranks"]), ("q1", rows[3]["ranks"])]


def test_a_partial_ranking_survives_a_reload(serve, open_page):
    server = serve(THREE)
    page = open_page(server)
    page.keyboard.press("2")
    page.keyboard.press("=")
    page.keyboard.press("3")
    page.locator("#note").fill("hard one")
    page.keyboard.press("Escape")
    before = page.locator("#ranking").text_content()
    page.reload()
    page.wait_for_selector(".card")
    assert placed(page) == 2 and page.locator("#ranking").text_content() == before
    assert page.locator("#note").input_value() == "hard one"
    page.keyboard.press("1")
    page.keyboard.press("Enter")
    page.locator("#prompt", has_text="question 1").wait_for()
    page.reload()
    page.wait_for_selector(".card")
    assert placed(page) == 0 and page.locator("#note").input_value() == ""  # a new item starts clean


# --------------------------------------------------------------------------- keyboard and screen readers

def test_cards_are_reachable_by_tab_and_say_their_rank(serve, open_page):
    server = serve(THREE)
    page = open_page(server)
    cards = page.locator(".card")
    assert [cards.nth(i).get_attribute(a) for i in range(3) for a in ("role", "tabindex", "aria-pressed")] == \
        ["button", "0", "false"] * 3
    assert page.locator("#ranking").get_attribute("aria-live") == "polite"
    assert all(page.eval_on_selector_all(sel, "els => els.length > 0 && els.every(e => e.dir === 'auto')")
               for sel in ("#prompt", ".card .md", ".card .md p", "#note"))
    for _ in range(6):  # Tab reaches a card
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.classList.contains('card')"):
            break
    else:
        raise AssertionError("Tab never reached a card")
    pos = page.evaluate("Number(document.activeElement.dataset.pos)")
    page.keyboard.press(" ")  # Space places the focused card
    focused = page.locator(f".card[data-pos='{pos}']")
    assert focused.get_attribute("aria-pressed") == "true"
    assert focused.get_attribute("aria-label") == f"Card {pos + 1}: ranked 1st"
    assert page.evaluate("document.activeElement.classList.contains('card')")  # the focus stays on it

    page.locator("#show-history").focus()  # a focused button keeps its keys: digits do nothing
    page.keyboard.press("2" if pos != 1 else "3")
    assert placed(page) == 1


def test_twenty_cards_by_two_digits(serve, open_page):
    server = serve([{"id": "k20", "prompt": "p", "responses": [f"r{i}" for i in range(20)]}])
    page = open_page(server, width=1280, height=900)

    def rank_of(n):
        return page.locator(f".card[data-pos='{n - 1}'] .badge").text_content()

    page.keyboard.press("1")
    page.keyboard.press("2")
    assert placed(page) == 1 and rank_of(12) == "#1"  # "12" is card twelve
    page.keyboard.press("3")
    assert rank_of(3) == "#2"  # no card 30+: card three at once
    page.keyboard.press("0")
    page.keyboard.press("5")
    assert rank_of(5) == "#3"
    page.keyboard.press("1")  # 1, or 10 to 19? wait for the next digit, then take card one
    assert placed(page) == 3 and "1_" in page.locator("#ranking").text_content()
    page.wait_for_function("document.querySelectorAll('.card.placed').length === 4", timeout=3000)
    assert rank_of(1) == "#4"
    page.keyboard.press("2")
    page.keyboard.press("=")  # another key ends the pending digit at once: card two, then a tie
    assert rank_of(2) == "#5"
    page.keyboard.press("2")
    page.keyboard.press("0")
    assert rank_of(20) == "#5" and placed(page) == 6  # card twenty, tied with card two
    assert page.locator(".card[data-pos='19']").get_attribute("aria-label") == "Card 20: ranked 5th (tied)"
    assert page.locator(".card[data-pos='11']").get_attribute("aria-label") == "Card 12: ranked 1st"
