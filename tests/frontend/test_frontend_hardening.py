"""Units of the frontend's hardening: a bug answers in OpenAI's error shape (never uvicorn's
plain-text 500), and long prompts are tokenized off the event loop."""

from __future__ import annotations

import json
import threading
from typing import Any

import anyio
import pytest

from services.frontend.http_app import OpenAIApp
from services.frontend.request import TOKENIZE_IN_THREAD_CHARS, encode_chat, encode_text


class ThreadNotingTokenizer:
    vocab_size = 100

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.threads: list[int] = []
        self.gil_free: list[bool] = []

    def encode(self, text: str, gil_free: bool = False) -> list[int]:
        self.threads.append(threading.get_ident())
        self.gil_free.append(gil_free)
        if self.fail:
            raise RuntimeError("tokenizer bug")
        return [1] * max(1, len(text) // 100)

    def encode_chat(self, messages: list[dict[str, Any]], gil_free: bool = False, **template_kwargs: Any) -> list[int]:
        return self.encode("".join(m["content"] for m in messages), gil_free)


class FakeGeneration:
    def __init__(self, tokenizer: ThreadNotingTokenizer) -> None:
        self.tokenizer = tokenizer


async def call(app: OpenAIApp, body: bytes) -> tuple[int, dict]:
    sent: list[dict] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await anyio.sleep_forever()
        raise AssertionError

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "path": "/v1/completions", "method": "POST", "headers": [], "client": ("1.2.3.4", 5)}
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body_out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body_out)


def test_unexpected_error_is_an_openai_500() -> None:
    app = OpenAIApp(FakeGeneration(ThreadNotingTokenizer(fail=True)), "m", 512, lambda: {})  # type: ignore[arg-type]
    status, body = anyio.run(call, app, json.dumps({"model": "m", "prompt": "hello"}).encode())
    assert status == 500
    assert body["error"]["type"] == "server_error" and body["error"]["code"] == "internal_error"
    assert "tokenizer bug" not in body["error"]["message"]  # internals stay in the log
    assert app.inflight == 0  # the slot was given back


@pytest.mark.parametrize("chat", [False, True])
def test_long_prompts_are_tokenized_in_a_thread(chat: bool) -> None:
    async def main() -> None:
        tok = ThreadNotingTokenizer()
        loop_thread = threading.get_ident()
        for n in (10, TOKENIZE_IN_THREAD_CHARS * 2):
            text = "x" * n
            if chat:
                await encode_chat(tok, [{"role": "user", "content": text}])  # type: ignore[arg-type]
            else:
                await encode_text(tok, text)  # type: ignore[arg-type]
        assert tok.threads[0] == loop_thread  # short: inline, no thread hop
        assert tok.threads[1] != loop_thread  # long: off the event loop
        assert tok.gil_free == [False, True]  # and there, the encoder that releases the GIL

    anyio.run(main)
