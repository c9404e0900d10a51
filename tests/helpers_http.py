"""A real OpenAI-compatible chat server on 127.0.0.1 for the LLM-judge tests (no mocks).

:class:`ChatServer` answers ``POST /v1/chat/completions`` with ``reply(text)``, where
``text`` is the content of the request's first message, and records every request. Tests
steer failures with ``fail_with`` (HTTP status codes for the next requests) and
``delay_first`` (seconds the next request waits before answering, to cause a timeout).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ChatServer:
    """``/v1/chat/completions`` on a free local port; ``url`` is its ``.../v1`` base URL."""

    def __init__(self, reply: Callable[[str], str]):
        self.reply = reply
        self.requests: list[dict] = []       # {"path", "headers", "body"} per request, in arrival order
        self.fail_with: list[int] = []
        self.delay_first = 0.0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, data: bytes, content_type: str = "application/json"):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    fail = outer.fail_with.pop(0) if outer.fail_with else None
                    delay, outer.delay_first = outer.delay_first, 0.0
                if delay:
                    time.sleep(delay)
                if fail is not None:
                    return self._send(fail, b'{"error": "try again"}')
                if self.path != "/v1/chat/completions":
                    return self._send(404, b'{"error": "not found"}')
                text = outer.reply(body["messages"][0]["content"])
                payload = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
                self._send(200, json.dumps(payload).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None  # a client that times out hangs up on purpose
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "ChatServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def dead_url() -> str:
    """A ``.../v1`` base URL on a local port that nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
