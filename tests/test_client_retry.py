"""baton.client retries only what never reached a worker (real sockets, no Baton needed)."""

from __future__ import annotations

import socket
import threading

import pytest

from baton.client import BatonClient, BatonError
from baton.nats_server import free_port

pytestmark = pytest.mark.timeout(30)


class Server:
    """Accepts connections, counts requests, and answers each with ``reply`` (None: never)."""

    def __init__(self, replies: list[bytes | None]) -> None:
        self.replies, self.requests = replies, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")))
            while len(body) < length:
                body += conn.recv(65536)
            reply = self.replies[min(self.requests, len(self.replies) - 1)]
            self.requests += 1
            if reply is None:
                self.held.append(conn)  # a generation that takes longer than the client waits
                continue
            conn.sendall(reply)
            conn.close()

    def close(self) -> None:
        self.sock.close()
        for c in self.held:
            c.close()


def http(status: int, body: bytes) -> bytes:
    return (f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


OK = http(200, b'{"id":"x","model":"m","choices":[{"index":0,"text":"hi","finish_reason":"length"}],'
               b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}')
BUSY = http(503, b'{"error":{"message":"overloaded","type":"service_unavailable","code":"overloaded"}}')


def test_read_timeout_after_sending_is_not_retried() -> None:
    server = Server([None])
    try:
        with BatonClient(f"http://127.0.0.1:{server.port}", timeout=0.5, max_retries=3, backoff=0.01) as c:
            with pytest.raises(BatonError, match="not retried"):
                c.complete("hello", max_tokens=1)
            assert c.retries == 0
        assert server.requests == 1  # one generation, never two
    finally:
        server.close()


def test_503_is_retried_and_then_succeeds() -> None:
    server = Server([BUSY, OK])
    try:
        with BatonClient(f"http://127.0.0.1:{server.port}", max_retries=3, backoff=0.01) as c:
            assert c.complete("hello", max_tokens=1).text == "hi"
            assert c.retries == 1
        assert server.requests == 2
    finally:
        server.close()


def test_connect_error_is_retried() -> None:
    with BatonClient(f"http://127.0.0.1:{free_port()}", max_retries=2, backoff=0.01) as c:
        with pytest.raises(BatonError, match="connection failed") as e:
            c.complete("hello", max_tokens=1)
        assert c.retries == 2 and e.value.sent is False
