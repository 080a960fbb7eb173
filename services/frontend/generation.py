"""The frontend's side of a generation: ask the router, stream from the chosen worker, detokenize.

Shared by the HTTP API and the NATS request API, so both behave the same: same routing, same
stop strings, same cancellation when the caller leaves, and the same survival when a worker dies
under a request. If a worker vanishes (no responders) or stops answering (its liveness probe
fails), the request migrates: it is resubmitted to another worker with the tokens generated so
far appended to the prompt, so it continues rather than restarts, and the caller sees one
uninterrupted stream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
from prometheus_client import Counter

from services.frontend import metrics
from services.frontend.openai_api import ApiError
from shared import subjects, tracing
from shared.bus import Bus, BusError, BusTimeout, NoResponders, SlowConsumer
from shared.kv_hash import block_hashes
from shared.messages import (
    Cancel,
    GenerateError,
    GenerateRequest,
    PositionLogprobs,
    RouteDecision,
    RouteError,
    RouteRequest,
    SamplingParams,
    StatusRequest,
    TokenChunk,
    Usage,
    generate_reply_decoder,
    route_reply_decoder,
    status_reply_decoder,
)
from shared.tokenizer import StopStringMatcher, Tokenizer

log = logging.getLogger("baton.frontend")

# The workers' default block size. The frontend hashes the prompt so the router need not (a
# 4k-token prompt costs ~0.3 ms to hash, the routing decision ~35 us); the router ignores
# hashes of another block size and hashes itself.
ROUTE_HASH_BLOCK_SIZE = 16

MIGRATIONS = Counter("baton_frontend_migrations_total", "Requests moved to another worker mid-flight", ["reason"])


@dataclass(slots=True)
class Delta:
    """New text of one choice for the caller. Each choice's last delta carries its finish_reason;
    the request's very last one also the usage (prompt counted once, completions summed)."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: Usage | None = None
    worker_id: str = ""
    choice: int = 0
    logprobs: list[PositionLogprobs] = field(default_factory=list)  # one per token_ids entry, when asked
    prompt_logprobs: list[PositionLogprobs] = field(default_factory=list)  # prompt positions 1.., once


@dataclass
class GenerationSettings:
    route_timeout: float = 2.0
    route_attempts: int = 3
    first_token_timeout: float = 300.0  # streamed: prefill of a long prompt on CPU can be slow
    # Not streamed (and no stop strings), the worker sends one chunk at the end: no first-token
    # timeout can apply, only a total deadline; liveness probes catch a dead worker meanwhile.
    request_timeout: float = 1800.0
    inter_token_timeout: float = 120.0
    probe_interval: float = 1.0  # silence longer than this: ask the worker if it is alive
    probe_timeout: float = 1.0
    max_migrations: int = 3  # worker failures one request may survive
    max_route_attempts: int = 3  # workers tried before the first token (no responders, full)


class _Migrate(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Generation:
    """Runs requests through router and workers for one served model."""

    def __init__(self, bus: Bus, tokenizer: Tokenizer, model: str, settings: GenerationSettings) -> None:
        self.bus = bus
        self.tokenizer = tokenizer
        self.model = model
        self.settings = settings

    async def _route(self, request_id: str, token_ids: list[int], exclude: list[str], parent: Any = None) -> RouteDecision:
        if not await self.bus.wait_connected():  # rides out a failover to another NATS server
            raise ApiError(503, "the message bus is unavailable; retry shortly", type="service_unavailable",
                           code="bus_unavailable")
        req = RouteRequest(request_id=request_id, model=self.model, token_ids=token_ids, exclude=exclude,
                           block_hashes=block_hashes(token_ids, ROUTE_HASH_BLOCK_SIZE),
                           block_size=ROUTE_HASH_BLOCK_SIZE)
        span = tracing.start("route", tracing.SpanKind.CLIENT, parent, **{"baton.request_id": request_id})
        # Routing is idempotent: a request lost with a dying router replica is simply asked again.
        for attempt in range(self.settings.route_attempts):
            try:
                msg = await self.bus.request(subjects.ROUTE, req, timeout=self.settings.route_timeout,
                                             headers=tracing.headers_for(span))
                break
            except BusError as e:
                if attempt + 1 == self.settings.route_attempts or not await self.bus.wait_connected():
                    tracing.end(span, error=str(e))
                    raise ApiError(503, f"router unavailable: {e}", type="service_unavailable",
                                   code="router_unavailable") from None
                if isinstance(e, NoResponders):
                    await anyio.sleep(0.2 * (attempt + 1))  # no router right now: give one a moment
        reply = route_reply_decoder.decode(msg.data)
        tracing.end(span, **({"baton.worker_id": reply.worker_id, "baton.overlap_blocks": reply.overlap_blocks}
                             if isinstance(reply, RouteDecision) else {"baton.route_error": reply.message}))
        if isinstance(reply, RouteError):
            kind = "service_unavailable" if reply.code >= 500 else "invalid_request_error"
            raise ApiError(reply.code, reply.message, type=kind, code="no_worker" if reply.code == 503 else None)
        return reply

    async def _alive(self, decision: RouteDecision, request_id: str) -> bool:
        """Does the worker still hold the request? No responders or silence means no."""
        try:
            msg = await self.bus.request(subjects.status(decision.worker_id), StatusRequest(request_ids=[request_id]),
                                         timeout=self.settings.probe_timeout)
        except (NoResponders, BusTimeout):
            return False
        return request_id in status_reply_decoder.decode(msg.data).known

    async def run(
        self,
        request_id: str,
        token_ids: list[int],
        sampling: SamplingParams,
        stops: list[str],
        stream: bool,
        parent: Any = None,
        include_stop_str: bool = False,
        skip_special_tokens: bool = True,
    ) -> AsyncIterator[Delta]:
        """Yield text deltas until the request finishes. Cancelling the iterator cancels the request.

        ``include_stop_str`` and ``skip_special_tokens`` are vLLM's request options of those names."""
        t0 = time.perf_counter()
        s = self.settings
        n = max(1, sampling.n)
        detoks = [self.tokenizer.detokenizer(skip_special_tokens) for _ in range(n)]
        matchers = [StopStringMatcher(stops, include_stop_str) for _ in range(n)]
        generated: list[list[int]] = [[] for _ in range(n)]  # tokens the caller has been given, per choice
        done = [False] * n  # choice finished (or stopped by a stop string)
        prompt_sent = False  # prompt logprobs went out (a resumed request does not ask again)
        cached_tokens = 0
        exclude: list[str] = []
        failures = 0
        # With stop strings the worker must stream, so the frontend can stop it early. A request
        # the caller does not stream needs no tokens from a worker that dies: it restarts whole.
        worker_streams = stream or bool(stops)
        while True:
            job_sampling = sampling
            if generated[0]:
                # n == 1 only (see the migration below): resume with what was generated so far;
                # every other knob (penalties, bias, constraints) carries over unchanged.
                job_sampling = msgspec.structs.replace(
                    sampling, max_tokens=sampling.max_tokens - len(generated[0]),
                    min_tokens=max(0, sampling.min_tokens - len(generated[0])),
                    prompt_logprobs=-1 if prompt_sent else sampling.prompt_logprobs)
            req = GenerateRequest(request_id=request_id, token_ids=token_ids + generated[0], sampling=job_sampling,
                                  model=self.model, stream=worker_streams)
            decision = await self._route(request_id, req.token_ids, exclude, parent)
            if decision.kv_source:  # G4: the worker may pull blocks a peer holds in its lower tiers
                req = msgspec.structs.replace(req, kv_source=decision.kv_source,
                                              kv_source_blocks=decision.kv_source_blocks)
            inbox = self.bus.inbox.open(request_id)
            finished = False
            gen_span = tracing.start("generate", tracing.SpanKind.CLIENT, parent, **{
                "baton.worker_id": decision.worker_id, "baton.resumed_tokens": len(generated[0])})
            try:
                await self.bus.publish(decision.subject, req, reply=inbox.subject, headers=tracing.headers_for(gen_span))
                silent = 0.0
                while True:
                    try:
                        msg = await inbox.next(s.probe_interval)
                    except NoResponders:
                        raise _Migrate("worker gone") from None
                    except BusTimeout:
                        silent += s.probe_interval
                        if not await self._alive(decision, request_id):
                            raise _Migrate("worker not answering") from None
                        if not worker_streams:
                            if time.perf_counter() - t0 >= s.request_timeout:
                                raise ApiError(504, f"the request took longer than its {s.request_timeout:g}s "
                                               "deadline (BATON_REQUEST_TIMEOUT)", type="server_error",
                                               code="request_timeout") from None
                            continue
                        limit = s.inter_token_timeout if any(generated) else s.first_token_timeout
                        if silent >= limit:
                            raise ApiError(504, f"worker {decision.worker_id} sent nothing for {silent:.0f}s",
                                           type="server_error", code="worker_timeout") from None
                        continue
                    except SlowConsumer:
                        raise ApiError(503, "the client read too slowly; request cancelled", type="server_error",
                                       code="slow_consumer") from None
                    except BusError as e:
                        if await self.bus.wait_connected():  # a NATS failover: replies in the gap are lost
                            raise _Migrate("bus reconnected") from None
                        raise ApiError(503, f"lost the message bus mid-request: {e}", type="service_unavailable",
                                       code="bus_unavailable") from None
                    silent = 0.0
                    # Coalesce: chunks that piled up while we were busy go out as one delta per choice.
                    for reply in _merge([generate_reply_decoder.decode(m.data) for m in (msg, *inbox.ready())]):
                        if isinstance(reply, GenerateError):
                            if reply.code == 503:  # worker full or draining: try another
                                finished = True
                                raise _Migrate("worker busy")
                            finished = True
                            raise ApiError(reply.code, reply.message,
                                           type="invalid_request_error" if reply.code < 500 else "server_error")
                        assert isinstance(reply, TokenChunk)
                        if not any(generated) and reply.token_ids:
                            metrics.TTFT.observe(time.perf_counter() - t0)
                        worker_done = reply.usage is not None  # the worker's last chunk of the request
                        if reply.usage is not None:
                            cached_tokens = max(cached_tokens, reply.usage.cached_tokens)
                        if reply.finish_reason in ("abort", "error"):
                            finished = True
                            raise _Migrate(f"worker {reply.finish_reason}")
                        c = reply.choice
                        if not 0 <= c < n or done[c]:  # a choice cut by a stop string: drop the rest
                            continue
                        generated[c].extend(reply.token_ids)
                        text = detoks[c].add(reply.token_ids) if reply.token_ids else ""
                        if reply.finish_reason is not None:
                            text += detoks[c].flush()
                        text, stopped = matchers[c].push(text)
                        prompt_lp = reply.prompt_logprobs
                        prompt_sent = prompt_sent or bool(prompt_lp)
                        if stopped or reply.finish_reason is not None:
                            done[c] = True
                            if not stopped:
                                text += matchers[c].flush()
                            last = all(done)
                            usage = None
                            if last:
                                usage = Usage(prompt_tokens=len(token_ids), completion_tokens=sum(map(len, generated)),
                                              cached_tokens=cached_tokens)
                                if not worker_done:
                                    await self._cancel(decision, request_id, "stop string")
                                finished = True
                            yield Delta(text, reply.token_ids, "stop" if stopped else reply.finish_reason, usage,
                                        decision.worker_id, c, reply.logprobs, prompt_lp)
                            if last:
                                return
                        elif text or reply.token_ids:
                            yield Delta(text, reply.token_ids, worker_id=decision.worker_id, choice=c,
                                        logprobs=reply.logprobs, prompt_logprobs=prompt_lp)
            except _Migrate as m:
                tracing.end(gen_span, error=m.reason)
                gen_span = None
                exclude.append(decision.worker_id)
                failures += 1
                if n > 1 and any(generated):
                    # Diverged choices cannot resume from one prompt: fail rather than repeat text.
                    raise ApiError(503, f"the worker failed mid-request ({m.reason}); a request with n > 1 "
                                   "cannot be resumed elsewhere", type="service_unavailable", code="no_worker") from None
                budget = s.max_migrations if generated else max(s.max_migrations, s.max_route_attempts)
                if failures > budget:
                    raise ApiError(503, f"request failed on {failures} workers ({m.reason})",
                                   type="service_unavailable", code="no_worker") from None
                MIGRATIONS.labels(m.reason).inc()
                log.warning("request %s: %s on %s after %d tokens; migrating", request_id, m.reason,
                            decision.worker_id, len(generated[0]))
                if not finished:
                    await self._cancel(decision, request_id, "migrated")
                    finished = True
            finally:
                tracing.end(gen_span, **{"gen_ai.usage.output_tokens": sum(map(len, generated))})
                self.bus.inbox.close(request_id)
                if not finished:
                    await self._cancel(decision, request_id, "caller left")

    async def _cancel(self, decision: RouteDecision, request_id: str, reason: str) -> None:
        with anyio.move_on_after(1, shield=True):
            try:
                await self.bus.publish(decision.cancel_subject, Cancel(request_id=request_id, reason=reason))
            except Exception as e:  # best effort: the worker's deadline also frees the request
                log.debug("cancel of %s failed: %r", request_id, e)


def _merge(replies: list[TokenChunk | GenerateError]) -> list[TokenChunk | GenerateError]:
    """Join runs of consecutive chunks of the same choice (an error ends the list)."""
    out: list[TokenChunk | GenerateError] = []
    for r in replies:
        if isinstance(r, GenerateError):
            out.append(r)
            return out
        prev = out[-1] if out else None
        if (isinstance(prev, TokenChunk) and prev.choice == r.choice and prev.finish_reason is None
                and not r.prompt_logprobs):
            out[-1] = TokenChunk(request_id=prev.request_id, index=prev.index, token_ids=prev.token_ids + r.token_ids,
                                 finish_reason=r.finish_reason, usage=r.usage, choice=r.choice,
                                 logprobs=prev.logprobs + r.logprobs, prompt_logprobs=prev.prompt_logprobs)
        else:
            out.append(r)
    return out
