"""Helpers for the labelling tests: a label server in a thread (``server_threads``) or a
subprocess (``start_server``), and Debian's Chromium through playwright's ``executable_path``
(never ``playwright install``), skipped with the reason where either is missing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager

import pytest

from rlfuse.engine.label.server import make_server, serve_in_thread

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


@contextmanager
def server_threads():
    """Yields ``run(tasks_path, labels_path, **make_server_options)``: a server thread on a free
    loopback port; every one started is stopped on the way out."""
    servers = []

    def run(tasks_path, labels_path, **kw):
        server = make_server(tasks_path, labels_path, host="127.0.0.1", port=0, **kw)
        serve_in_thread(server)
        servers.append(server)
        return server

    try:
        yield run
    finally:
        for server in servers:
            stop_server(server)


def stop_server(server) -> None:
    """Stop serving and close the labels file (again: a no-op)."""
    if not server.store._fh.closed:
        server.shutdown()
        server.server_close()
        server.store.close()


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
