"""The OpenAI-compatible HTTP API as a bare ASGI app (no framework: this is the hot path).

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models and /v1/models/{model},
POST /tokenize and POST /detokenize (vLLM's shapes), POST /v1/load_lora_adapter and
/v1/unload_lora_adapter (vLLM's), GET /health, GET /metrics. Every error is OpenAI's error object
with the right status.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

import anyio
import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.frontend import metrics
from services.frontend.access import ANONYMOUS, AccessControl, Tenant
from services.frontend.admission import Admission, AdmissionSettings, Admitted
from services.frontend.choices import ChoiceShaper, sse_event
from services.frontend.generation import Generation
from services.frontend.http_protocol import CLIENT_WATCH, ClientWatch
from services.frontend.lora_admin import LoraAdmin
from services.frontend.models import ModelRegistry, ServedModel
from services.frontend.openai_api import (
    ChatCompletionRequest,
    RequestError,
    chat_decoder,
    chat_messages,
    completion_decoder,
    decode_request,
    detokenize_decoder,
    load_lora_decoder,
    tokenize_decoder,
    unload_lora_decoder,
    usage_chunk,
)
from services.frontend.request import (
    DEFAULT_MAX_N,
    DEFAULT_PRIORITY_RANGE,
    PRIORITY_HEADER,
    SESSION_HEADER,
    TEMPLATE_ERRORS,
    TOKENIZE_IN_THREAD_CHARS,
    RequestHints,
    RequestLimits,
    check_token_ids,
    from_chat,
    from_completion,
)
from services.frontend.structured import ChatOutput, name_structured_error, template_messages
from services.frontend.text_stream import Delta
from services.frontend.tool_parsers import ToolParser
from shared import probe, tracing
from shared.messages import Usage
from shared.telemetry import bind_request

log = logging.getLogger("baton.frontend.http")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_json = msgspec.json.Encoder()
_JSON_HEADERS = [(b"content-type", b"application/json")]
_SSE_DONE = b"data: [DONE]\n\n"
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


def _header_map(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in headers if k in (b"traceparent", b"tracestate")}


_TOKEN_ROUTES = ("/tokenize", "/detokenize")
_LORA_ROUTES = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
_ANONYMOUS = Tenant(ANONYMOUS)
_PRIORITY_HEADER = PRIORITY_HEADER.encode()
_SESSION_HEADER = SESSION_HEADER.encode()
_NO_HINTS = RequestHints()


def _hints(headers: list[tuple[bytes, bytes]]) -> RequestHints:
    """x-baton-priority and x-session-id, if sent (ASGI header names are lowercase; the last one
    sent wins)."""
    priority = session = None
    for k, v in headers:
        if k == _PRIORITY_HEADER:
            priority = v.decode("latin-1")
        elif k == _SESSION_HEADER:
            session = v.decode("latin-1")
    if priority is None and session is None:
        return _NO_HINTS
    return RequestHints(priority, session)


# Counter children by (endpoint, status): labels() takes a lock and builds a key every call. Bounded,
# since a 401 on an unknown /v1/ path is labelled with that path.
_REQUEST_COUNTERS: dict[tuple[str, int], Any] = {}


def _count_request(endpoint: str, status: int) -> None:
    child = _REQUEST_COUNTERS.get((endpoint, status))
    if child is None:
        child = metrics.REQUESTS.labels(endpoint, str(status))
        if len(_REQUEST_COUNTERS) < 256:
            _REQUEST_COUNTERS[endpoint, status] = child
    child.inc()


class _Progress:
    """Whether a response's headers are out (then an error can no longer get its own response)."""

    __slots__ = ("started",)

    def __init__(self) -> None:
        self.started = False


def _uuid4_hex() -> str:
    """``uuid.uuid4().hex``, bit for bit (random, version 4, RFC 4122 variant), without building a UUID."""
    n = int.from_bytes(os.urandom(16), "big")
    n = (n & ~(0xF000 << 64) | (4 << 76)) & ~(0xC000 << 48) | (0x8000 << 48)
    return f"{n:032x}"


class ClientGone(Exception):
    pass


class OpenAIApp:
    def __init__(
        self,
        generation: Generation | None,  # with ``models``: None (each served model has its own)
        model: str | None,
        max_model_len: int,
        ready: Callable[[], dict[str, Any] | None],
        max_body_bytes: int = 2 * 1024 * 1024,
        max_inflight: int = 2048,
        access: AccessControl | None = None,
        max_prompt_tokens: int = 0,
        body_timeout: float = 30.0,
        max_n: int = DEFAULT_MAX_N,
        tool_parser: ToolParser | None = None,
        reasoning_parser: str | None = None,
        lora_admin: LoraAdmin | None = None,
        models: ModelRegistry | None = None,
        admission: Admission | None = None,
        priority_range: tuple[int, int] = DEFAULT_PRIORITY_RANGE,
    ) -> None:
        self.ready = ready  # returns a status dict when ready, None when not
        self.max_body_bytes = max_body_bytes
        self.max_inflight = max_inflight
        self.access = access
        self.body_timeout = body_timeout  # seconds a client has to send the whole body
        self.inflight = 0
        self.created = int(time.time())
        self.reasoning_parser = reasoning_parser  # splits <think> into reasoning_content
        if models is None:  # one model, given here (tests, embedding): a registry that only preloads it
            assert generation is not None
            models = ModelRegistry()
            # what requests are checked against (max_prompt_tokens 0: only the context bounds a prompt)
            limits = RequestLimits(model or "", max_model_len, max_prompt_tokens, max_n, tool_parser, priority_range)
            models.preload(ServedModel(name=model or "", tokenizer=generation.tokenizer, max_model_len=max_model_len,
                                       limits=limits, generation=generation, tool_parser=tool_parser,
                                       created=self.created))
        self.models = models  # every model served, by name (services/frontend/models.py)
        self.admission = admission or Admission(AdmissionSettings())  # shared with the NATS API
        self.lora_admin = lora_admin  # LoRA adapters loaded and unloaded at run time

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        endpoint = path
        status = 500
        progress = _Progress()
        tenant = _ANONYMOUS
        try:
            if (path.startswith("/v1/") or path in _TOKEN_ROUTES) and self.access is not None:
                tenant = self.access.tenant_of(self.access.admit_http(scope["headers"], scope.get("client")))
            if path == "/v1/chat/completions" or path == "/v1/completions":
                if method != "POST":
                    raise RequestError(405, f"use POST for {path}", code="method_not_allowed")
                # The body first, under a deadline, and only then a slot: clients that send slowly
                # cannot hold every slot, and a full frontend still refuses at once.
                body = await self._read_body(scope, receive)
                if self.inflight >= self.max_inflight:
                    # Admission control: answer at once rather than queue past what we can serve.
                    raise RequestError(503, f"overloaded: {self.inflight} requests in flight; retry shortly",
                                   type="service_unavailable", code="overloaded")
                self.inflight += 1
                metrics.INFLIGHT.inc()
                t0 = time.perf_counter()
                try:
                    root = None
                    if tracing.ENABLED:
                        root = tracing.start(f"{method} {path}", tracing.SpanKind.SERVER,
                                             tracing.context_from(_header_map(scope["headers"])),
                                             **{"http.request.method": method, "url.path": path})
                    try:
                        status = await self._generate(path == "/v1/chat/completions", body, scope, receive,
                                                      send, root, tenant, scope["headers"], progress)
                    except RequestError as e:
                        if root is not None:
                            tracing.end(root, error=e.message, **{"http.response.status_code": e.status})
                            root = None
                        raise
                    finally:
                        if root is not None:
                            tracing.end(root, **{"http.response.status_code": status})
                finally:
                    self.inflight -= 1
                    metrics.INFLIGHT.dec()
                    metrics.DURATION.observe(time.perf_counter() - t0)
            elif path in _TOKEN_ROUTES:
                if method != "POST":
                    raise RequestError(405, f"use POST for {path}", code="method_not_allowed")
                body = await self._read_body(scope, receive)
                result = await (self._tokenize(body) if path == "/tokenize" else self._detokenize(body))
                status = await self._send_json(send, 200, result)
            elif path in _LORA_ROUTES:
                if method != "POST":
                    raise RequestError(405, f"use POST for {path}", code="method_not_allowed")
                if self.lora_admin is None:
                    raise RequestError(404, "this frontend serves no LoRA adapters", code="not_found")
                raw = await self._read_body(scope, receive)
                if path == "/v1/load_lora_adapter":
                    load = decode_request(raw, load_lora_decoder)
                    result = await self.lora_admin.load(load.lora_name, load.lora_path)
                else:
                    result = await self.lora_admin.unload(decode_request(raw, unload_lora_decoder).lora_name)
                status = await self._send_json(send, 200, result)
            elif path == "/v1/models" and method == "GET":
                status = await self._send_json(send, 200, self._models())
            elif path.startswith("/v1/models/") and method == "GET":
                endpoint = "/v1/models/{model}"  # one metrics label, whatever the name
                status = await self._send_json(send, 200, self._model_entry(path.removeprefix("/v1/models/")))
            elif path == "/health" or path == "/health/ready":
                st = self.ready()
                status = await self._send_json(send, 200 if st else 503, st or {"status": "not ready"})
            elif path == "/health/live":
                status = await self._send_json(send, 200, {"status": "alive"})
            elif path == "/metrics" and method == "GET":
                body = generate_latest()
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode())]})
                await send({"type": "http.response.body", "body": body})
                status = 200
            else:
                endpoint = "other"
                raise RequestError(404, f"no route for {method} {path}", code="not_found")
        except RequestError as e:
            if progress.started:  # headers already out (cannot happen for RequestError today, but never send twice)
                raise
            status = await self._send_json(send, e.status, e.body(), [*_JSON_HEADERS, *e.headers])
        except ClientGone:
            status = 499
        except Exception:
            # A bug, not the client's fault: OpenAI's error shape, never uvicorn's plain-text 500.
            log.exception("%s %s failed", method, path)
            if progress.started:
                raise  # mid-stream: all we can do is close the connection
            err = RequestError(500, "internal error; the request was not completed", type="server_error",
                           code="internal_error")
            status = await self._send_json(send, 500, err.body())
        finally:
            _count_request(endpoint, status)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    raise RequestError(400, "invalid Content-Length") from None
                if declared > self.max_body_bytes:
                    raise RequestError(413, f"request body exceeds {self.max_body_bytes} bytes", code="request_too_large")
        body = bytearray()
        watch: ClientWatch | None = (scope.get("extensions") or {}).get(CLIENT_WATCH)
        if watch is not None and watch.body_complete:
            # The whole body came with the headers (the connection says so): receive() cannot
            # wait, so there is no deadline (a cancel scope and a timer per request) to keep.
            if self._body_part(await receive(), body):
                return bytes(body)
        with anyio.move_on_after(self.body_timeout):
            while not self._body_part(await receive(), body):
                pass
            return bytes(body)
        err = RequestError(408, f"the request body did not arrive within {self.body_timeout:g}s", code="request_timeout")
        err.headers.append((b"connection", b"close"))
        raise err

    def _body_part(self, message: dict[str, Any], body: bytearray) -> bool:
        """One received message's part of the body added to ``body``; True once it is the last."""
        if message["type"] == "http.disconnect":
            raise ClientGone
        body += message.get("body", b"")
        if len(body) > self.max_body_bytes:
            raise RequestError(413, f"request body exceeds {self.max_body_bytes} bytes", code="request_too_large")
        return not message.get("more_body", False)

    async def _send_json(self, send: Send, status: int, obj: Any, headers: list | None = None) -> int:
        await send({"type": "http.response.start", "status": status, "headers": headers or _JSON_HEADERS})
        await send({"type": "http.response.body", "body": _json.encode(obj)})
        return status

    def _models(self) -> dict[str, Any]:
        return {"object": "list", "data": self.models.listing()}

    def _model_entry(self, name: str) -> dict[str, Any]:
        """OpenAI's retrieve-model: one listed entry, or 404 ``model_not_found``."""
        for entry in self.models.listing():
            if entry["id"] == name:
                return entry
        self.models.resolve(name)  # raises the 404 (or 503 while it loads), with the served names
        raise RequestError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")

    def _model_for(self, name: str | None) -> tuple[ServedModel, RequestLimits]:
        """The served model a request names (404 if none serves it); no name: the default one."""
        if name is None:
            served = self.models.default()
            return served, served.limits
        return self.models.limits_for(name)

    async def _tokenize(self, body: bytes) -> dict[str, Any]:
        """vLLM's /tokenize: a prompt, or chat messages rendered by the chat template."""
        req = decode_request(body, tokenize_decoder)
        served, _ = self._model_for(req.model)
        tokenizer = served.tokenizer
        if (req.prompt is None) == (req.messages is None):
            raise RequestError(400, "give exactly one of prompt and messages", param="prompt")
        if req.prompt is not None:
            add_special = True if req.add_special_tokens is None else req.add_special_tokens
            if len(req.prompt) < TOKENIZE_IN_THREAD_CHARS:
                ids = tokenizer.encode(req.prompt, add_special_tokens=add_special)
            else:
                ids = await anyio.to_thread.run_sync(lambda: tokenizer.encode(req.prompt, add_special, gil_free=True))
        else:
            chat = ChatCompletionRequest(model=served.name, messages=req.messages or [])
            messages = chat_messages(chat)
            gen_prompt = True if req.add_generation_prompt is None else req.add_generation_prompt
            try:
                text = tokenizer.apply_chat_template(template_messages(messages), add_generation_prompt=gen_prompt)
            except TEMPLATE_ERRORS as e:
                raise RequestError(400, f"the chat template refused these messages: {e}", param="messages") from None
            ids = tokenizer.encode(text, add_special_tokens=bool(req.add_special_tokens))
        strs = [tokenizer.decode([t], skip_special_tokens=False) for t in ids] if req.return_token_strs else None
        return {"count": len(ids), "max_model_len": served.max_model_len, "tokens": ids, "token_strs": strs}

    async def _detokenize(self, body: bytes) -> dict[str, Any]:
        req = decode_request(body, detokenize_decoder)
        served, _ = self._model_for(req.model)
        check_token_ids(req.tokens, served.tokenizer, "tokens")
        return {"prompt": served.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    async def _generate(self, chat: bool, body: bytes, scope: Scope, receive: Receive, send: Send,
                        root: Any = None, tenant: Tenant | None = None,
                        headers: list[tuple[bytes, bytes]] | None = None, progress: _Progress | None = None) -> int:
        rid = f"chatcmpl-{_uuid4_hex()}" if chat else f"cmpl-{_uuid4_hex()}"
        if probe.on:  # the TTFT probe (shared/probe.py)
            probe.app_start(rid, scope)
        bind_request(rid, tracing.trace_id_of(root))  # this request's log lines (and access line) carry it
        body_req = decode_request(body, chat_decoder if chat else completion_decoder)
        served, limits = self._model_for(body_req.model)
        model = served.name
        hints = _hints(headers or [])
        if chat:
            req = await from_chat(body_req, served.tokenizer, limits, rid, hints)
        else:
            req = await from_completion(body_req, served.tokenizer, limits, rid, hints)
        chat_output = None
        if req.tool_plan is not None:
            tool_plan = req.tool_plan
            tool_parser = served.tool_parser

            def chat_output() -> ChatOutput:  # one per choice: tool calls and reasoning read from its text
                return ChatOutput(tool_plan, tool_parser, self.reasoning_parser)
        shaper = ChoiceShaper(served.tokenizer, req.plan, chat, rid, model, req.prompt_text, req.token_ids,
                              chat_output)
        metrics.INPUT_TOKENS.observe(len(req.token_ids))
        tracing.event(root, "tokenized")
        if root is not None:
            root.set_attributes({"gen_ai.operation.name": "chat" if chat else "text_completion",
                                 "gen_ai.request.model": model, "gen_ai.request.max_tokens": req.sampling.max_tokens,
                                 "gen_ai.request.temperature": req.sampling.temperature,
                                 "gen_ai.usage.input_tokens": len(req.token_ids), "gen_ai.response.id": rid})
        trace_header = [(b"x-trace-id", tracing.trace_id_of(root).encode())] if root is not None else []
        # Admission holds the slot around the pump below; the deltas come straight from the generation.
        admitted = self.admission.admit(req, tenant or _ANONYMOUS)
        generation = served.generation
        progress = progress or _Progress()
        try:
            if req.stream:
                return await self._stream(chat, rid, admitted, lambda: generation.run(req, root), req.include_usage,
                                          receive, send, trace_header, shaper, model, scope, progress)
            return await self._complete(chat, rid, admitted, lambda: generation.run(req, root), receive, send,
                                        trace_header, shaper, scope, progress)
        except RequestError as e:
            raise name_structured_error(e, req.structured_param) from None

    async def _complete(self, chat: bool, rid: str, admitted: Admitted, deltas: Callable[[], AsyncIterator[Delta]],
                        receive: Receive, send: Send, extra_headers: list[tuple[bytes, bytes]], shaper: ChoiceShaper,
                        scope: Scope, progress: _Progress) -> int:
        final: Delta | None = None

        async def collect() -> None:
            nonlocal final
            async with admitted, aclosing(deltas()) as it:
                async for d in it:
                    admitted.used(len(d.token_ids))
                    shaper.add(d)
                    final = d

        await _run_unless_disconnected(collect, receive, scope)
        assert final is not None and final.finish_reason is not None
        usage = final.usage or Usage()
        metrics.OUTPUT_TOKENS.observe(usage.completion_tokens)
        body = shaper.body(usage)
        if probe.on:
            probe.mark("first_write", rid)
        progress.started = True
        return await self._send_json(send, 200, body, [*_JSON_HEADERS, (b"x-request-id", rid.encode()), *extra_headers])

    async def _stream(self, chat: bool, rid: str, admitted: Admitted, deltas: Callable[[], AsyncIterator[Delta]],
                      include_usage: bool, receive: Receive, send: Send, extra_headers: list[tuple[bytes, bytes]],
                      shaper: ChoiceShaper, model: str, scope: Scope, progress: _Progress) -> int:
        """Server-sent events: one body write per delta (its events joined), the headers held until
        the first one (the connection sends what one loop turn wrote as one packet; http_protocol.py)."""
        created = shaper.created
        started = False
        obj = "chat.completion.chunk" if chat else "text_completion"
        itl = metrics.ITL.observe

        async def start(worker: str) -> None:
            nonlocal started
            started = progress.started = True
            await send({"type": "http.response.start", "status": 200,
                        "headers": [*_SSE_HEADERS, (b"x-request-id", rid.encode()),
                                    (b"x-baton-worker", worker.encode()), *extra_headers]})

        async def pump() -> None:
            last = time.perf_counter()
            async with admitted, aclosing(deltas()) as it:
                async for d in it:
                    admitted.used(len(d.token_ids))
                    if not started:
                        if probe.on:
                            probe.mark("first_write", rid)
                        await start(d.worker_id)  # errors before the first token still get a proper status
                        body = shaper.sse_start() + shaper.sse_delta(d)
                    else:
                        body = shaper.sse_delta(d)
                    now = time.perf_counter()
                    itl(now - last)
                    last = now
                    if d.usage is not None:  # the request's last delta (every choice finished)
                        usage = d.usage
                        metrics.OUTPUT_TOKENS.observe(usage.completion_tokens)
                        if include_usage:
                            body += sse_event(usage_chunk(rid, model, created, obj, usage))
                        await send({"type": "http.response.body", "body": body + _SSE_DONE, "more_body": False})
                        return
                    if body:
                        await send({"type": "http.response.body", "body": body, "more_body": True})
            await send({"type": "http.response.body", "body": _SSE_DONE, "more_body": False})

        try:
            await _run_unless_disconnected(pump, receive, scope)
        except RequestError as e:
            if not started:
                raise
            # Headers are gone: report in-band, as OpenAI's servers do, then end the stream.
            await send({"type": "http.response.body", "body": sse_event(e.body()) + _SSE_DONE, "more_body": False})
        return 200


async def _run_unless_disconnected(work: Callable[[], Awaitable[None]], receive: Receive, scope: Scope) -> None:
    """Run ``work``; if the client disconnects first, cancel it (which cancels the request).

    Under Baton's HTTP protocol the connection says when its client is gone (a ClientWatch in
    the scope); under another ASGI server a second task waits on ``receive()`` instead."""
    watch: ClientWatch | None = (scope.get("extensions") or {}).get(CLIENT_WATCH)
    if watch is None:
        return await _run_watching_receive(work, receive)
    # The task itself is cancelled, not an anyio CancelScope around ``work``: entering and leaving
    # a scope costs several times what the rest of this does, on every request. The connection
    # fires the watch from its callbacks, so only while the task waits inside ``work`` (a client
    # gone already is checked first), and the CancelledError comes out of ``work``; uncancel()
    # tells ours from any other cancel of the task (a shutdown), which goes on.
    if watch.gone:
        raise ClientGone
    task = asyncio.current_task()
    assert task is not None
    gone = False

    def cancel() -> None:
        nonlocal gone
        gone = True
        task.cancel()

    watch.on_gone(cancel)
    try:
        await work()
    except asyncio.CancelledError:
        if not gone or task.uncancel() > 0:
            raise
        raise ClientGone from None
    except BaseException:
        if gone:  # work() turned our cancel into another error
            task.uncancel()
        raise
    else:
        if gone:  # work() swallowed our cancel: the client is gone all the same
            task.uncancel()
            raise ClientGone
    finally:
        watch.on_gone(None)


async def _run_watching_receive(work: Callable[[], Awaitable[None]], receive: Receive) -> None:
    gone = False
    done = False
    error: BaseException | None = None
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            nonlocal gone
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone = True
                    tg.cancel_scope.cancel()
                    return

        async def run() -> None:
            nonlocal error, done
            try:
                await work()
                done = True
            except Exception as e:  # re-raised below, unwrapped from the task group
                error = e
            finally:
                tg.cancel_scope.cancel()

        tg.start_soon(watch)
        tg.start_soon(run)
    if error is not None:
        raise error
    # Once the response is complete, uvicorn reports a disconnect: that is not a client leaving.
    if gone and not done:
        raise ClientGone
