"""The frontend's HTTP connection (services/frontend/http_protocol.py) under a real uvicorn server:
a body that arrives with its headers is read at once (the connection marks it complete), and a
body that trickles in after the request started is still read whole, under its deadline; request
ids are uuid4's."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
import uvicorn

from baton.nats_server import free_port
from services.frontend.http_app import OpenAIApp, _uuid4_hex
from services.frontend.http_protocol import CLIENT_WATCH, protocol_with
from tests.procs import wait_until


class _Tokenizer:
    vocab_size = 100


class _Generation:
    tokenizer = _Tokenizer()


class BodyEcho:
    """Reads the body as the OpenAI app does and answers it back; notes whether the connection
    said the body was complete when the request started."""

    def __init__(self) -> None:
        self.app = OpenAIApp(_Generation(), "m", 512, lambda: {}, body_timeout=5.0)  # type: ignore[arg-type]
        self.complete_at_start: list[bool] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.complete_at_start.append(scope["extensions"][CLIENT_WATCH].body_complete)
        body = await self.app._read_body(scope, receive)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
def server() -> Iterator[tuple[int, BodyEcho]]:
    app = BodyEcho()
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=protocol_with(5.0), loop="none",
                            lifespan="off", log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: anyio.run(srv.serve), daemon=True)
    thread.start()
    wait_until(lambda: srv.started, 10, what="the HTTP server")
    yield port, app
    srv.should_exit = True
    thread.join(10)


def _answer(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data or not data.endswith(b"hello world"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


HEAD = b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 11\r\n\r\n"


def test_a_body_sent_with_its_headers_is_complete_at_once(server: tuple[int, BodyEcho]) -> None:
    port, app = server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(HEAD + b"hello world")
        assert _answer(c).endswith(b"hello world")
    assert app.complete_at_start == [True]


def test_a_body_sent_after_the_request_started_is_read_whole(server: tuple[int, BodyEcho]) -> None:
    port, app = server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(HEAD + b"hello")
        wait_until(lambda: len(app.complete_at_start) == 1, 10, what="the request to start")
        c.sendall(b" world")
        assert _answer(c).endswith(b"hello world")
    assert app.complete_at_start == [False]


def test_request_ids_are_uuid4_hex() -> None:
    ids = {_uuid4_hex() for _ in range(1000)}
    assert len(ids) == 1000
    for h in ids:
        u = uuid.UUID(h)
        assert u.hex == h and u.version == 4 and u.variant == uuid.RFC_4122
