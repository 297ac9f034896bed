"""``rlfuse label serve``: the labelling page and its JSON API on the standard library's http.server.

    GET  /                          the page (``page.html``, package data, no build step)
    GET  /api/next?annotator=NAME   the task to rank now, its shuffled cards, guidelines, progress
    GET  /api/history?annotator=NAME        this annotator's labelled and skipped tasks, newest first
    GET  /api/task?annotator=NAME&id=TASK   one of them again, with the saved label
    POST /api/label                 {"annotator", "task_id", "ranks" | "skipped": true, "skip_reason",
                                     "note", "none_acceptable", "shown_order", "seconds",
                                     "guidelines_sha256", "revise"} -> progress
Requests run in threads; the ``LabelStore`` serialises the writes. Bound to loopback, the
server needs no token but answers only requests addressed to localhost (a web page
elsewhere cannot reach it through DNS rebinding). Bound to anything else (``--host``), it
makes a random token, prints a URL carrying it, and refuses every request without it.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import secrets
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from .records import read_tasks
from .store import LabelError, LabelStore

MAX_BODY = 1 << 20
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def page_html() -> bytes:
    return resources.files("rlfuse.engine.label").joinpath("page.html").read_bytes()


class LabelServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, store: LabelStore, host: str, port: int, token: str | None):
        self.store, self.token = store, token
        super().__init__((host, port), LabelHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        if is_loopback(host):
            host = "localhost"
        elif host in ("0.0.0.0", "::", ""):  # every interface: name this machine
            host = socket.gethostname()
        return f"http://{host}:{port}/" + (f"?token={self.token}" if self.token else "")


class LabelHandler(BaseHTTPRequestHandler):
    server: LabelServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - quiet: one line per request would drown the URL
        pass

    # ------------------------------------------------------------------ helpers

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        try:
            body = json.dumps(obj, ensure_ascii=False).encode()
        except UnicodeEncodeError:  # an error message echoing a lone surrogate: \u-escape it
            body = json.dumps(obj).encode()
        self._send(status, body, "application/json; charset=utf-8")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _allowed(self, query: dict) -> bool:
        token = self.server.token
        if token is None:  # loopback: only requests addressed to localhost
            host = urlsplit("//" + (self.headers.get("Host") or "")).hostname or ""
            return is_loopback(host)
        given = self.headers.get("X-Label-Token") or query.get("token", [""])[0]
        return hmac.compare_digest(given.encode(), token.encode())

    # ------------------------------------------------------------------ routes

    def do_GET(self):  # noqa: N802 - http.server's naming
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if not self._allowed(query):
            return self._error(403, "missing or wrong token: open the URL the server printed")
        if url.path in ("/", "/index.html"):
            return self._send(200, page_html(), "text/html; charset=utf-8")
        store, annotator = self.server.store, query.get("annotator", [""])[0]
        routes = {"/api/next": lambda: store.next_task(annotator),
                  "/api/history": lambda: store.history(annotator),
                  "/api/task": lambda: store.reopen(annotator, query.get("id", [""])[0])}
        if url.path not in routes:
            return self._error(404, f"no such page: {url.path}")
        try:
            return self._json(200, routes[url.path]())
        except LabelError as exc:
            return self._error(exc.status, str(exc))

    def do_POST(self):  # noqa: N802
        url = urlsplit(self.path)
        if not self._allowed(parse_qs(url.query)):
            return self._error(403, "missing or wrong token: open the URL the server printed")
        if url.path != "/api/label":
            return self._error(404, f"no such endpoint: {url.path}")
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY:
            return self._error(400 if length <= MAX_BODY else 413, "expected a JSON body of at most 1 MiB")
        try:
            body = json.loads(self.rfile.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return self._error(400, "the body is not valid JSON")
        if not isinstance(body, dict):
            return self._error(400, "expected a JSON object")
        store = self.server.store
        try:
            label = store.submit(body.get("annotator"), body.get("task_id"), ranks=body.get("ranks"),
                                 skipped=body.get("skipped", False), note=body.get("note", ""),
                                 none_acceptable=body.get("none_acceptable", False),
                                 order=body.get("shown_order"), seconds=body.get("seconds"),
                                 skip_reason=body.get("skip_reason", ""), revise=body.get("revise", False),
                                 guidelines_sha256=body.get("guidelines_sha256"))
        except LabelError as exc:
            return self._error(exc.status, str(exc))
        return self._json(200, {"ok": True, "task_id": label.task_id, **store.progress(label.annotator)})


def read_guidelines(path) -> str:
    """The ``--guidelines`` markdown file's text (UTF-8), refused with its name when unreadable."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--guidelines {p}: file not found (a markdown file of what 'better' means)")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"--guidelines {p}: not valid UTF-8 (byte {exc.start + 1})") from None
    if not text.strip():
        raise ValueError(f"--guidelines {p}: the file is empty")
    return text


def make_server(tasks_path, labels_path, *, host: str = "127.0.0.1", port: int = 8000, overlap: int = 1,
                token: str | None = None, guidelines=None) -> LabelServer:
    """A ready server (not yet serving). Beyond loopback a token is always required.
    ``guidelines`` is the path of a markdown file shown above every task."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"--port must be a TCP port from 0 to 65535 (0 = any free port), got {port}")
    text = None if guidelines is None else read_guidelines(guidelines)
    store = LabelStore(read_tasks(tasks_path), labels_path, overlap=overlap, guidelines=text)
    if token is None and not is_loopback(host):
        token = secrets.token_urlsafe(16)
    try:
        return LabelServer(store, host, port, token)
    except OSError as exc:
        store.close()
        raise ValueError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None


def serve_in_thread(server: LabelServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name="rlfuse-label", daemon=True)
    thread.start()
    return thread


def serve(tasks_path, labels_path, *, host: str, port: int, overlap: int, guidelines=None) -> int:
    server = make_server(tasks_path, labels_path, host=host, port=port, overlap=overlap, guidelines=guidelines)
    n = len(server.store.tasks)
    print(f"[rlfuse] {n} tasks, labels -> {labels_path} (overlap {overlap})"
          + (f", guidelines {guidelines}" if guidelines else ""))
    print(f"[rlfuse] open {server.url}", flush=True)
    if server.token:
        print("[rlfuse] the token in that URL is required: share it only with your annotators", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.store.close()
    return 0
