"""The frontend's side of a generation: ask the router, stream from the chosen worker, detokenize.

Shared by the HTTP API and the NATS request API, so both behave the same: same routing, same
retries when a worker has vanished, same stop strings, same cancellation when the caller leaves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio

from services.frontend import metrics
from services.frontend.openai_api import ApiError
from shared.bus import Bus, BusError, BusTimeout, NoResponders
from shared.messages import (
    Cancel,
    GenerateError,
    GenerateRequest,
    RouteDecision,
    RouteError,
    RouteRequest,
    SamplingParams,
    TokenChunk,
    Usage,
    generate_reply_decoder,
    route_reply_decoder,
)
from shared.subjects import ROUTE
from shared.tokenizer import StopStringMatcher, Tokenizer

log = logging.getLogger("baton.frontend")


@dataclass(slots=True)
class Delta:
    """New text for the caller; the last one carries finish_reason and usage."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass
class GenerationSettings:
    route_timeout: float = 5.0
    first_token_timeout: float = 300.0  # prefill of a long prompt on CPU can be slow
    inter_token_timeout: float = 120.0
    max_route_attempts: int = 3


class Generation:
    """Runs requests through router and workers for one served model."""

    def __init__(self, bus: Bus, tokenizer: Tokenizer, model: str, settings: GenerationSettings) -> None:
        self.bus = bus
        self.tokenizer = tokenizer
        self.model = model
        self.settings = settings

    async def _route(self, request_id: str, token_ids: list[int], exclude: list[str]) -> RouteDecision:
        req = RouteRequest(request_id=request_id, model=self.model, token_ids=token_ids, exclude=exclude)
        try:
            msg = await self.bus.request(ROUTE, req, timeout=self.settings.route_timeout)
        except BusError as e:
            raise ApiError(503, f"router unavailable: {e}", type="service_unavailable", code="router_unavailable") from None
        reply = route_reply_decoder.decode(msg.data)
        if isinstance(reply, RouteError):
            kind = "service_unavailable" if reply.code >= 500 else "invalid_request_error"
            raise ApiError(reply.code, reply.message, type=kind, code="no_worker" if reply.code == 503 else None)
        return reply

    async def run(
        self,
        request_id: str,
        token_ids: list[int],
        sampling: SamplingParams,
        stops: list[str],
        stream: bool,
    ) -> AsyncIterator[Delta]:
        """Yield text deltas until the request finishes. Cancelling the iterator cancels the request."""
        t0 = time.perf_counter()
        detok = self.tokenizer.detokenizer()
        matcher = StopStringMatcher(stops)
        exclude: list[str] = []
        # With stop strings the worker must stream, so the frontend can stop it early.
        worker_streams = stream or bool(stops)
        req = GenerateRequest(
            request_id=request_id, token_ids=token_ids, sampling=sampling, model=self.model, stream=worker_streams
        )
        for attempt in range(self.settings.max_route_attempts):
            decision = await self._route(request_id, token_ids, exclude)
            inbox = self.bus.inbox.open(request_id)
            finished = False
            got_any = False
            try:
                await self.bus.publish(decision.subject, req, reply=inbox.subject)
                timeout = self.settings.first_token_timeout
                while True:
                    try:
                        msg = await inbox.next(timeout)
                    except NoResponders:
                        if got_any:
                            raise ApiError(503, "worker went away mid-request", type="service_unavailable") from None
                        log.info("worker %s has no responders; rerouting %s", decision.worker_id, request_id)
                        exclude.append(decision.worker_id)
                        finished = True  # nothing to cancel there
                        break
                    except BusTimeout:
                        raise ApiError(
                            503, f"worker {decision.worker_id} did not answer in time", type="service_unavailable",
                            code="worker_timeout",
                        ) from None
                    reply = generate_reply_decoder.decode(msg.data)
                    if isinstance(reply, GenerateError):
                        finished = True
                        raise ApiError(reply.code, reply.message, type="invalid_request_error" if reply.code < 500 else "server_error")
                    assert isinstance(reply, TokenChunk)
                    if not got_any:
                        got_any = True
                        metrics.TTFT.observe(time.perf_counter() - t0)
                        timeout = self.settings.inter_token_timeout
                    text = detok.add(reply.token_ids) if reply.token_ids else ""
                    if reply.finish_reason is not None:
                        text += detok.flush()
                    text, stopped = matcher.push(text)
                    if stopped:
                        usage = Usage(
                            prompt_tokens=len(token_ids),
                            completion_tokens=reply.index + len(reply.token_ids),
                            cached_tokens=reply.usage.cached_tokens if reply.usage else 0,
                        )
                        if reply.finish_reason is None:
                            await self._cancel(decision, request_id, "stop string")
                        finished = True
                        yield Delta(text, reply.token_ids, "stop", usage)
                        return
                    if reply.finish_reason is not None:
                        finished = True
                        text += matcher.flush()
                        usage = reply.usage or Usage(
                            prompt_tokens=len(token_ids), completion_tokens=reply.index + len(reply.token_ids)
                        )
                        finish = "length" if reply.finish_reason == "length" else "stop"
                        if reply.finish_reason in ("abort", "error"):
                            raise ApiError(503, f"request {reply.finish_reason}ed by the worker", type="server_error")
                        yield Delta(text, reply.token_ids, finish, usage)
                        return
                    if text or reply.token_ids:
                        yield Delta(text, reply.token_ids)
            finally:
                self.bus.inbox.close(request_id)
                if not finished:
                    await self._cancel(decision, request_id, "caller left")
            if attempt + 1 < self.settings.max_route_attempts:
                continue
        raise ApiError(503, "no decode worker answered", type="service_unavailable", code="no_worker")

    async def _cancel(self, decision: RouteDecision, request_id: str, reason: str) -> None:
        with anyio.move_on_after(1, shield=True):
            try:
                await self.bus.publish(decision.cancel_subject, Cancel(request_id=request_id, reason=reason))
            except Exception as e:  # best effort: the worker's deadline also frees the request
                log.debug("cancel of %s failed: %r", request_id, e)
