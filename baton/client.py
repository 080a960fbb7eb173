"""Baton's Python client: sync and async, over HTTP (OpenAI API) or the NATS request API.

    from baton.client import BatonClient
    with BatonClient("http://127.0.0.1:8000") as c:
        print(c.chat([{"role": "user", "content": "Hi"}], max_tokens=16).text)
        for chunk in c.chat_stream([{"role": "user", "content": "Hi"}]):
            print(chunk.text, end="")

Retries with exponential backoff only when the request is known not to have reached a worker:
connect errors (nothing was sent) and 429/503 (refused before any work; Retry-After honoured).
Never after the request was sent: a read timeout or a dropped connection may mean a generation is
already running, and retrying would run it twice; those raise at once (status 0). Never on other
4xx/5xx either.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import msgspec

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUS = (429, 503)
# Transport errors that mean the request never left this process: safe to send again.
NOT_SENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# A new connection per request: on a reused keep-alive connection whose server died while it sat
# idle, a send fails with a reset that looks like a failure after sending, and would not be
# retried. Fresh connections make "not sent" unambiguous; a localhost handshake costs ~0.1 ms,
# nothing next to a generation.
_LIMITS = httpx.Limits(max_keepalive_connections=0)


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0


class Completion(msgspec.Struct, kw_only=True):
    id: str
    model: str
    text: str
    finish_reason: str | None
    usage: Usage


class StreamChunk(msgspec.Struct, kw_only=True):
    text: str
    finish_reason: str | None = None
    usage: Usage | None = None


class BatonError(Exception):
    """An error answer from Baton (OpenAI's error object), or a transport failure (status 0)."""

    def __init__(self, status: int, message: str, type: str = "", code: str | None = None,
                 param: str | None = None, sent: bool = True) -> None:
        super().__init__(f"{status} {type}: {message}" if status else message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.sent = sent  # False: a transport failure before the request left (safe to retry)

    @classmethod
    def from_transport(cls, e: httpx.TransportError) -> BatonError:
        if isinstance(e, NOT_SENT_ERRORS):
            return cls(0, f"connection failed: {e!r}", sent=False)
        return cls(0, f"request sent, then the connection failed ({e!r}); not retried: it may be running",
                   sent=True)

    @classmethod
    def from_response(cls, status: int, body: bytes) -> BatonError:
        try:
            err = json.loads(body)["error"]
            return cls(status, err.get("message", ""), err.get("type", ""), err.get("code"), err.get("param"))
        except (ValueError, KeyError, TypeError):
            return cls(status, body[:200].decode(errors="replace"))

    @property
    def retryable(self) -> bool:
        return (self.status == 0 and not self.sent) or self.status in RETRY_STATUS


def _usage(u: dict[str, Any] | None) -> Usage | None:
    if not u:
        return None
    return Usage(prompt_tokens=u.get("prompt_tokens", 0), completion_tokens=u.get("completion_tokens", 0),
                 total_tokens=u.get("total_tokens", 0),
                 cached_tokens=(u.get("prompt_tokens_details") or {}).get("cached_tokens", 0))


def _completion(body: dict[str, Any], chat: bool) -> Completion:
    choice = body["choices"][0]
    text = choice["message"]["content"] if chat else choice["text"]
    return Completion(id=body["id"], model=body["model"], text=text or "", finish_reason=choice["finish_reason"],
                      usage=_usage(body.get("usage")) or Usage())


def _chunk(event: dict[str, Any], chat: bool) -> StreamChunk | None:
    if "error" in event:
        err = event["error"]
        raise BatonError(500, err.get("message", ""), err.get("type", ""), err.get("code"))
    if not event.get("choices"):
        return StreamChunk(text="", usage=_usage(event.get("usage"))) if event.get("usage") else None
    choice = event["choices"][0]
    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
    return StreamChunk(text=text or "", finish_reason=choice.get("finish_reason"))


class _Policy:
    def __init__(self, max_retries: int, backoff: float, max_backoff: float) -> None:
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff

    def delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(float(retry_after), self.max_backoff)
            except ValueError:
                pass
        return min(self.backoff * (2**attempt), self.max_backoff) * (0.5 + random.random() / 2)


def _body(model: str, chat: bool, prompt: Any, stream: bool, params: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "stream": stream, **params}
    body["messages" if chat else "prompt"] = prompt
    if stream:
        body.setdefault("stream_options", {"include_usage": True})
    return body


class BatonClient:
    """Synchronous HTTP client."""

    def __init__(self, base_url: str = DEFAULT_URL, *, model: str = "baton-tiny", api_key: str | None = None,
                 timeout: float = 60.0, max_retries: int = 3, backoff: float = 0.25, max_backoff: float = 8.0) -> None:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.model = model
        self._http = httpx.Client(base_url=base_url, timeout=timeout, headers=headers, limits=_LIMITS)
        self._policy = _Policy(max_retries, backoff, max_backoff)
        self.retries = 0  # how many times a call was retried (observable in tests and logs)

    def __enter__(self) -> BatonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        for attempt in range(self._policy.max_retries + 1):
            try:
                r = self._http.post(path, json=body)
            except httpx.TransportError as e:
                err, retry_after = BatonError.from_transport(e), None
            else:
                if r.status_code == 200:
                    return r.json()
                err, retry_after = BatonError.from_response(r.status_code, r.content), r.headers.get("retry-after")
            if not err.retryable or attempt == self._policy.max_retries:
                raise err
            self.retries += 1
            time.sleep(self._policy.delay(attempt, retry_after))
        raise AssertionError("unreachable")

    def _stream(self, path: str, body: dict[str, Any], chat: bool) -> Iterator[StreamChunk]:
        for attempt in range(self._policy.max_retries + 1):
            started = False
            try:
                with self._http.stream("POST", path, json=body) as r:
                    if r.status_code != 200:
                        r.read()
                        err = BatonError.from_response(r.status_code, r.content)
                        if not err.retryable or attempt == self._policy.max_retries:
                            raise err
                        self.retries += 1
                        time.sleep(self._policy.delay(attempt, r.headers.get("retry-after")))
                        continue
                    for line in r.iter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            return
                        chunk = _chunk(json.loads(line[6:]), chat)
                        if chunk is not None:
                            started = True
                            yield chunk
                    return
            except httpx.TransportError as e:
                err = BatonError.from_transport(e)
                if started or not err.retryable or attempt == self._policy.max_retries:
                    raise err from e
                self.retries += 1
                time.sleep(self._policy.delay(attempt, None))

    def chat(self, messages: list[dict[str, str]], *, model: str | None = None, **params: Any) -> Completion:
        return _completion(self._post("/v1/chat/completions", _body(model or self.model, True, messages, False, params)), True)

    def chat_stream(self, messages: list[dict[str, str]], *, model: str | None = None, **params: Any) -> Iterator[StreamChunk]:
        return self._stream("/v1/chat/completions", _body(model or self.model, True, messages, True, params), True)

    def complete(self, prompt: str | list[int], *, model: str | None = None, **params: Any) -> Completion:
        return _completion(self._post("/v1/completions", _body(model or self.model, False, prompt, False, params)), False)

    def complete_stream(self, prompt: str | list[int], *, model: str | None = None, **params: Any) -> Iterator[StreamChunk]:
        return self._stream("/v1/completions", _body(model or self.model, False, prompt, True, params), False)

    def models(self) -> list[str]:
        return [m["id"] for m in self._http.get("/v1/models").json()["data"]]


class AsyncBatonClient:
    """Asynchronous HTTP client (asyncio or anyio)."""

    def __init__(self, base_url: str = DEFAULT_URL, *, model: str = "baton-tiny", api_key: str | None = None,
                 timeout: float = 60.0, max_retries: int = 3, backoff: float = 0.25, max_backoff: float = 8.0) -> None:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.model = model
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout, headers=headers, limits=_LIMITS)
        self._policy = _Policy(max_retries, backoff, max_backoff)
        self.retries = 0

    async def __aenter__(self) -> AsyncBatonClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        for attempt in range(self._policy.max_retries + 1):
            try:
                r = await self._http.post(path, json=body)
            except httpx.TransportError as e:
                err, retry_after = BatonError.from_transport(e), None
            else:
                if r.status_code == 200:
                    return r.json()
                err, retry_after = BatonError.from_response(r.status_code, r.content), r.headers.get("retry-after")
            if not err.retryable or attempt == self._policy.max_retries:
                raise err
            self.retries += 1
            await asyncio.sleep(self._policy.delay(attempt, retry_after))
        raise AssertionError("unreachable")

    async def _stream(self, path: str, body: dict[str, Any], chat: bool) -> AsyncIterator[StreamChunk]:
        for attempt in range(self._policy.max_retries + 1):
            started = False
            try:
                async with self._http.stream("POST", path, json=body) as r:
                    if r.status_code != 200:
                        await r.aread()
                        err = BatonError.from_response(r.status_code, r.content)
                        if not err.retryable or attempt == self._policy.max_retries:
                            raise err
                        self.retries += 1
                        await asyncio.sleep(self._policy.delay(attempt, r.headers.get("retry-after")))
                        continue
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            return
                        chunk = _chunk(json.loads(line[6:]), chat)
                        if chunk is not None:
                            started = True
                            yield chunk
                    return
            except httpx.TransportError as e:
                err = BatonError.from_transport(e)
                if started or not err.retryable or attempt == self._policy.max_retries:
                    raise err from e
                self.retries += 1
                await asyncio.sleep(self._policy.delay(attempt, None))

    async def chat(self, messages: list[dict[str, str]], *, model: str | None = None, **params: Any) -> Completion:
        return _completion(await self._post("/v1/chat/completions", _body(model or self.model, True, messages, False, params)), True)

    def chat_stream(self, messages: list[dict[str, str]], *, model: str | None = None, **params: Any) -> AsyncIterator[StreamChunk]:
        return self._stream("/v1/chat/completions", _body(model or self.model, True, messages, True, params), True)

    async def complete(self, prompt: str | list[int], *, model: str | None = None, **params: Any) -> Completion:
        return _completion(await self._post("/v1/completions", _body(model or self.model, False, prompt, False, params)), False)

    def complete_stream(self, prompt: str | list[int], *, model: str | None = None, **params: Any) -> AsyncIterator[StreamChunk]:
        return self._stream("/v1/completions", _body(model or self.model, False, prompt, True, params), False)


class NatsBatonClient:
    """Async client over the NATS request API (``baton.v1.api.generate``), msgpack on the wire."""

    def __init__(self, nats_url: str = "nats://127.0.0.1:4222", *, timeout: float = 60.0, api_key: str | None = None,
                 creds: str | None = None, **connect: Any) -> None:
        """``creds``: a Baton credentials file for the bus (the ``client`` identity that ``baton up``
        or ``baton auth init`` writes); other ``nats.connect`` options pass through."""
        if creds is not None:
            from shared.nats_auth import read_credentials

            connect = {**read_credentials(creds).connect_options(), **connect}
        self.nats_url, self.timeout, self._connect = nats_url, timeout, connect
        # The frontend checks API keys on NATS as on HTTP: the key rides in a header.
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._nc: Any = None

    async def __aenter__(self) -> NatsBatonClient:
        import nats

        self._nc = await nats.connect(self.nats_url, **self._connect)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._nc is not None:
            await self._nc.close()

    async def stream(self, *, prompt: str | None = None, messages: list[dict[str, str]] | None = None,
                     token_ids: list[int] | None = None, **params: Any) -> AsyncIterator[StreamChunk]:
        from shared.messages import (
            ApiError,
            ApiGenerateRequest,
            ChatMessage,
            api_reply_msgpack_decoder,
            encode,
        )
        from shared.subjects import API_GENERATE

        req = ApiGenerateRequest(prompt=prompt, token_ids=token_ids,
                                 messages=[ChatMessage(role=m["role"], content=m["content"]) for m in messages]
                                 if messages is not None else None, **params)
        inbox = self._nc.new_inbox()
        sub = await self._nc.subscribe(inbox)
        try:
            await self._nc.publish(API_GENERATE, encode(req), reply=inbox, headers=self._headers)
            while True:
                msg = await sub.next_msg(timeout=self.timeout)
                reply = api_reply_msgpack_decoder.decode(msg.data)
                if isinstance(reply, ApiError):
                    raise BatonError(reply.code, reply.message)
                usage = Usage(prompt_tokens=reply.usage.prompt_tokens, completion_tokens=reply.usage.completion_tokens,
                              total_tokens=reply.usage.prompt_tokens + reply.usage.completion_tokens,
                              cached_tokens=reply.usage.cached_tokens) if reply.usage else None
                yield StreamChunk(text=reply.text, finish_reason=reply.finish_reason, usage=usage)
                if reply.finish_reason is not None:
                    return
        finally:
            await sub.unsubscribe()

    async def generate(self, **kwargs: Any) -> StreamChunk:
        text, last = [], None
        async for chunk in self.stream(**kwargs):
            text.append(chunk.text)
            last = chunk
        assert last is not None
        return StreamChunk(text="".join(text), finish_reason=last.finish_reason, usage=last.usage)
