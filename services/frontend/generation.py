"""The frontend's side of a generation: ask the router, stream from the chosen worker, migrate.

Shared by the HTTP API and the NATS request API, so both behave the same: same routing, same
text (``text_stream.py`` detokenizes and applies stop strings), same cancellation when the caller
leaves, and the same survival when a worker dies under a request. If a worker vanishes (no responders) or stops answering (its liveness probe
fails), the request migrates: it is resubmitted to another worker with the tokens generated so
far appended to the prompt, so it continues rather than restarts, and the caller sees one
uninterrupted stream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
from prometheus_client import Counter

from services.frontend import metrics
from services.frontend.openai_api import RequestError
from services.frontend.request import ValidatedRequest
from services.frontend.text_stream import Delta, ReplyText, coalesce
from shared import probe, subjects, tracing
from shared.bus import Bus, BusError, BusTimeout, NoResponders, ReplyStream, SlowConsumer, decoded
from shared.kv_hash import adapter_root, block_hashes
from shared.messages import (
    Cancel,
    GenerateError,
    GenerateRequest,
    RouteDecision,
    RouteError,
    RouteRequest,
    StatusRequest,
    TokenChunk,
    Usage,
    generate_reply_decoder,
    status_reply_decoder,
)
from shared.routing.client import RouteClient
from shared.routing.core import RouterCore
from shared.routing.lease import RouteLeases
from shared.tokenizer import Tokenizer

log = logging.getLogger("baton.frontend")

# The workers' default block size. The frontend hashes the prompt so the router need not (a
# 4k-token prompt costs ~0.3 ms to hash, the routing decision ~35 us); the router ignores
# hashes of another block size and hashes itself.
ROUTE_HASH_BLOCK_SIZE = 16

MIGRATIONS = Counter("baton_frontend_migrations_total", "Requests moved to another worker mid-flight", ["reason"])


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

    def __init__(self, bus: Bus, tokenizer: Tokenizer, model: str, settings: GenerationSettings,
                 router: RouterCore | None = None, leases: RouteLeases | None = None,
                 fleet_serves: Callable[[str], bool] | None = None) -> None:
        self.bus = bus
        self.tokenizer = tokenizer
        self.model = model
        self.settings = settings
        self.router = router  # --router embedded: decide in process, no route hop
        self.leases = leases  # the router service's decisions held ahead (round-robin, random)
        self._route_client: RouteClient | None = None  # the router service's (made on first use)
        # Whether this frontend's own view of the fleet has a decode worker for a model: when the
        # router service says none does, but this says one does, the router's view lags (it has
        # just started, or the worker has just registered) and is asked again.
        self.fleet_serves = fleet_serves

    async def _route(self, request_id: str, token_ids: list[int], exclude: list[str], parent: Any = None,
                     session_id: str = "", lora: str = "", lora_digest: str = "", max_tokens: int = 0) -> RouteDecision:
        if not await self.bus.wait_connected():  # rides out a failover to another NATS server
            raise RequestError(503, "the message bus is unavailable; retry shortly", type="service_unavailable",
                           code="bus_unavailable")
        if self.leases is not None and self.router is None and not (exclude or session_id or lora):
            leased = self.leases.take(self.model, len(token_ids), max_tokens)
            if leased is not None:
                if tracing.ENABLED:
                    span = tracing.start("route", tracing.SpanKind.CLIENT, parent, **{
                        "baton.request_id": request_id, "baton.route_lease": True})
                    tracing.end(span, **{"baton.worker_id": leased.worker_id})
                return leased
        # Under an adapter the chain starts at its root, as in the worker's cache (shared.kv_hash).
        # The embedded router without a KV-aware policy reads no hashes: none are made for it.
        if self.router is None or self.router.kv is not None:
            root = adapter_root(lora, lora_digest) if lora else adapter_root(None)
            hashes = block_hashes(token_ids, ROUTE_HASH_BLOCK_SIZE, root)
        else:
            hashes = []
        req = RouteRequest(request_id=request_id, model=self.model, token_ids=token_ids, exclude=exclude,
                           block_hashes=hashes,
                           block_size=ROUTE_HASH_BLOCK_SIZE, session_id=session_id, lora=lora,
                           max_tokens=max_tokens)
        span = tracing.start("route", tracing.SpanKind.CLIENT, parent, **{"baton.request_id": request_id})
        if self.router is not None:
            reply = await self.router.route(req, self.settings.route_timeout)
        else:
            reply = await self._ask_router(req, span)
        tracing.end(span, **({"baton.worker_id": reply.worker_id, "baton.overlap_blocks": reply.overlap_blocks}
                             if isinstance(reply, RouteDecision) else {"baton.route_error": reply.message}))
        if isinstance(reply, RouteError):
            kind = "service_unavailable" if reply.code >= 500 else "invalid_request_error"
            raise RequestError(reply.code, reply.message, type=kind, code="no_worker" if reply.code == 503 else None)
        return reply

    async def _ask_router(self, req: RouteRequest, span: Any) -> RouteDecision | RouteError:
        """The router service's answer. Routing is idempotent: a request lost with a dying router
        replica is simply asked again. Requests of one event-loop turn go as one batch, and the answer
        comes through the process's reply inbox (shared/routing/client.py)."""
        if self._route_client is None:
            self._route_client = RouteClient(self.bus)
        for attempt in range(self.settings.route_attempts):
            try:
                reply = await self._route_client.route(req, self.settings.route_timeout, tracing.headers_for(span))
            except BusError as e:
                if attempt + 1 == self.settings.route_attempts or not await self.bus.wait_connected():
                    tracing.end(span, error=str(e))
                    raise RequestError(503, f"router unavailable: {e}", type="service_unavailable",
                                   code="router_unavailable") from None
                if isinstance(e, NoResponders):
                    await anyio.sleep(0.2 * (attempt + 1))  # no router right now: give one a moment
                continue
            if (isinstance(reply, RouteError) and reply.code == 503 and attempt + 1 < self.settings.route_attempts
                    and self.fleet_serves is not None and self.fleet_serves(req.model)):
                await anyio.sleep(0.1 * (attempt + 1))  # the router's view of the fleet is behind ours
                continue
            return reply
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _alive(self, decision: RouteDecision, request_id: str) -> bool:
        """Does the worker still hold the request? No responders or silence means no."""
        try:
            msg = await self.bus.request(subjects.status(decision.worker_id), StatusRequest(request_ids=[request_id]),
                                         timeout=self.settings.probe_timeout)
        except (NoResponders, BusTimeout):
            return False
        return request_id in status_reply_decoder.decode(msg.data).known

    async def run(self, req: ValidatedRequest, parent: Any = None) -> AsyncIterator[Delta]:
        """Yield text deltas until the request finishes. Cancelling the iterator cancels the request.

        The route/migrate loop: each pass routes the request (with the tokens so far, when it
        resumes), then streams from that worker until the request ends or the worker fails."""
        t0 = time.perf_counter()
        s = self.settings
        reply = ReplyText(self.tokenizer, req.text, max(1, req.sampling.n))
        cached_tokens = 0
        exclude: list[str] = []
        failures = 0
        # With stop strings the worker must stream, so the frontend can stop it early. A request
        # the caller does not stream needs no tokens from a worker that dies: it restarts whole.
        worker_streams = req.stream or bool(req.text.stops)
        while True:
            job = self._job(req, reply, worker_streams)
            decision = await self._route(req.request_id, job.token_ids, exclude, parent, req.session_id, req.lora,
                                         req.lora_digest, job.sampling.max_tokens)
            if probe.on:  # the TTFT probe (shared/probe.py)
                probe.mark("routed", req.request_id)
            if decision.kv_source:  # G4: the worker may pull blocks a peer holds in its lower tiers
                job = msgspec.structs.replace(job, kv_source=decision.kv_source,
                                              kv_source_blocks=decision.kv_source_blocks)
            inbox = self.bus.inbox.open(req.request_id)
            finished = False
            gen_span = tracing.start("generate", tracing.SpanKind.CLIENT, parent, **{
                "baton.worker_id": decision.worker_id, "baton.resumed_tokens": len(reply.generated[0])})
            try:
                headers = tracing.headers_for(gen_span)
                if headers is not None or not self.bus.publish_soon(decision.subject, job, reply=inbox.subject):
                    await self.bus.publish(decision.subject, job, reply=inbox.subject, headers=headers)
                if probe.on:
                    probe.mark("job_published", req.request_id)
                while True:
                    for chunk in await self._next_replies(inbox, decision, req.request_id, worker_streams, reply, t0):
                        if isinstance(chunk, GenerateError):
                            finished = True
                            if chunk.code == 503:  # worker full or draining: try another
                                raise _Migrate("worker busy")
                            raise RequestError(chunk.code, chunk.message,
                                               type="invalid_request_error" if chunk.code < 500 else "server_error")
                        if not reply.any_tokens and chunk.token_ids:
                            metrics.TTFT.observe(time.perf_counter() - t0)
                            if probe.on:
                                probe.mark("first_reply", req.request_id)
                        worker_done = chunk.usage is not None  # the worker's last chunk of the request
                        if chunk.usage is not None:
                            cached_tokens = max(cached_tokens, chunk.usage.cached_tokens)
                        if chunk.finish_reason in ("abort", "error"):
                            finished = True
                            raise _Migrate(f"worker {chunk.finish_reason}")
                        delta = reply.feed(chunk, decision.worker_id)
                        if delta is None:
                            continue
                        if delta.finish_reason is not None and reply.all_done:
                            delta.usage = Usage(prompt_tokens=len(req.token_ids),
                                                completion_tokens=reply.completion_tokens, cached_tokens=cached_tokens)
                            if not worker_done:  # a stop string ended it: free the worker
                                await self._cancel(decision, req.request_id, "stop string")
                            finished = True
                            yield delta
                            return
                        yield delta
            except _Migrate as m:
                tracing.end(gen_span, error=m.reason)
                gen_span = None
                exclude.append(decision.worker_id)
                if self.leases is not None:
                    self.leases.forget(self.model, decision.worker_id)
                failures += 1
                if reply.n > 1 and reply.any_tokens:
                    # Diverged choices cannot resume from one prompt: fail rather than repeat text.
                    raise RequestError(503, f"the worker failed mid-request ({m.reason}); a request with n > 1 "
                                       "cannot be resumed elsewhere", type="service_unavailable",
                                       code="no_worker") from None
                budget = s.max_migrations if reply.any_tokens else max(s.max_migrations, s.max_route_attempts)
                if failures > budget:
                    raise RequestError(503, f"request failed on {failures} workers ({m.reason})",
                                       type="service_unavailable", code="no_worker") from None
                MIGRATIONS.labels(m.reason).inc()
                log.warning("request %s: %s on %s after %d tokens; migrating", req.request_id, m.reason,
                            decision.worker_id, len(reply.generated[0]))
                if not finished:
                    await self._cancel(decision, req.request_id, "migrated")
                    finished = True
            finally:
                tracing.end(gen_span, **{"gen_ai.usage.output_tokens": reply.completion_tokens})
                self.bus.inbox.close(req.request_id)
                if not finished:
                    await self._cancel(decision, req.request_id, "caller left")

    async def _next_replies(self, inbox: ReplyStream, decision: RouteDecision, request_id: str, worker_streams: bool,
                            reply: ReplyText, t0: float) -> list[TokenChunk | GenerateError]:
        """The worker's next replies (a burst coalesced). While it is silent, probe that it still
        holds the request (else migrate) and keep the deadlines."""
        s = self.settings
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
                        raise RequestError(504, f"the request took longer than its {s.request_timeout:g}s "
                                           "deadline (BATON_REQUEST_TIMEOUT)", type="server_error",
                                           code="request_timeout") from None
                    continue
                limit = s.inter_token_timeout if reply.any_tokens else s.first_token_timeout
                if silent >= limit:
                    raise RequestError(504, f"worker {decision.worker_id} sent nothing for {silent:.0f}s",
                                       type="server_error", code="worker_timeout") from None
                continue
            except SlowConsumer:
                raise RequestError(503, "the client read too slowly; request cancelled", type="server_error",
                                   code="slow_consumer") from None
            except BusError as e:
                if await self.bus.wait_connected():  # a NATS failover: replies in the gap are lost
                    raise _Migrate("bus reconnected") from None
                raise RequestError(503, f"lost the message bus mid-request: {e}", type="service_unavailable",
                                   code="bus_unavailable") from None
            return coalesce(decoded((msg, *inbox.ready()), generate_reply_decoder))

    def _job(self, req: ValidatedRequest, reply: ReplyText, worker_streams: bool) -> GenerateRequest:
        """The worker's job: the prompt, and on a resumed request (n == 1 only, see the migration
        above) the tokens generated so far, with the budgets shrunk by as many; every other knob
        (penalties, bias, constraints) carries over unchanged."""
        sampling = req.sampling
        so_far = reply.generated[0]
        if so_far:
            sampling = msgspec.structs.replace(
                sampling, max_tokens=sampling.max_tokens - len(so_far),
                min_tokens=max(0, sampling.min_tokens - len(so_far)),
                prompt_logprobs=-1 if reply.prompt_logprobs_sent else sampling.prompt_logprobs)
        return GenerateRequest(request_id=req.request_id, token_ids=req.token_ids + so_far, sampling=sampling,
                               model=self.model, stream=worker_streams, batch_reply=self.bus.inbox.batch_subject,
                               lora=req.lora)

    async def _cancel(self, decision: RouteDecision, request_id: str, reason: str) -> None:
        with anyio.move_on_after(1, shield=True):
            try:
                await self.bus.publish(decision.cancel_subject, Cancel(request_id=request_id, reason=reason))
            except Exception as e:  # best effort: the worker's deadline also frees the request
                log.debug("cancel of %s failed: %r", request_id, e)

