"""A Slack-compatible webhook receiver on 127.0.0.1 for the alert tests: a real HTTP server
that records every POST, and answers with `status` (set it to 500 to test retries)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Webhook:
    url: str
    posts: list[dict] = field(default_factory=list)
    """The JSON of each POST answered with 200."""
    raw: list[bytes] = field(default_factory=list)
    """Every POST's body as received, whatever the answer."""
    status: int = 200

    def texts(self) -> list[str]:
        return [post["text"] for post in self.posts]


@contextmanager
def webhook_receiver(secret: str) -> Iterator[Webhook]:
    """A receiver whose URL ends in `secret`, like a Slack incoming webhook's: tests check the
    secret never shows up in what Maestro sends, logs or stores."""
    receiver = Webhook(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's naming)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            receiver.raw.append(body)
            if receiver.status == 200:
                receiver.posts.append(json.loads(body))
            self.send_response(receiver.status)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/services/T0000/B0000/{secret}"
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
