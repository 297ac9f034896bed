"""Helpers for the labelling page's browser tests: Debian's Chromium through playwright's
``executable_path`` (never ``playwright install``), skipped with the reason where either is
missing, and a label server in a subprocess or a thread."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

CHROMIUM = os.environ.get("RLFUSE_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def sync_playwright_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright Python package is not installed (pip install playwright; "
                    "the browser is Debian's chromium, never `playwright install`)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or set RLFUSE_CHROMIUM)")
    return sync_playwright


def launch(pw):
    return pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tasks, labels, port: int, *extra: str) -> subprocess.Popen:
    """``rlfuse label serve`` in a subprocess (so a test can SIGKILL it), once it answers."""
    proc = subprocess.Popen([sys.executable, "-m", "rlfuse.engine.cli", "label", "serve", str(tasks),
                             "--labels", str(labels), "--port", str(port), *extra],
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
    """The cards' texts in the order the page shows them."""
    return page.eval_on_selector_all(".card .md", "els => els.map(e => e.textContent)")
