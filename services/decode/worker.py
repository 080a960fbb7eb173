"""The decode worker actor: registers, takes generate requests on its own subject, streams tokens.

One class owns the engine, the in-flight requests and the registration. Each request runs as a
task in the worker's task group; a Cancel message, a deadline or a drain cancels it, and the
engine frees its KV blocks when its stream is closed.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge

from services.decode.disagg import DECISIONS as DISAGG_DECISIONS
from services.decode.disagg import DisaggSettings, RemotePrefill
from shared import subjects, tracing
from shared.bus import Bus, ReplyBatcher
from shared.config import DEFAULT_NATS_URL
from shared.discovery import DEFAULT_TTL, WorkerRegistration, WorkerView
from shared.engines import Engine, EngineConfig, make_engine
from shared.kv_address import advertised_host, bind_host_for
from shared.kv_hash import block_hashes
from shared.kv_transport import KvTls, KvTransport, make_transport
from shared.messages import (
    GenerateError,
    GenerateRequest,
    KvEventBatch,
    KvFetchReply,
    KvFetchRequest,
    LoadReport,
    PositionLogprobs,
    StatusReply,
    TokenChunk,
    Usage,
    WorkerInfo,
    cancel_decoder,
    generate_request_decoder,
    kv_fetch_reply_decoder,
    kv_fetch_request_decoder,
    status_request_decoder,
)
from shared.runtime import settle_heap
from shared.telemetry import bind_request, serve_metrics

log = logging.getLogger("baton.decode")

MAX_N_HARD = 128  # a worker's own bound on choices per request (the frontend's --max-n is lower)

REQUESTS = Counter("baton_worker_requests_total", "Requests by outcome", ["role", "outcome"])
RUNNING = Gauge("baton_worker_requests_running", "Requests in flight", ["role"])
KV_USED = Gauge("baton_worker_kv_blocks_used", "KV blocks in use", ["role"])
KV_TOTAL = Gauge("baton_worker_kv_blocks_total", "KV blocks in the pool", ["role"])
KV_USAGE = Gauge("baton_worker_kv_cache_usage_ratio", "Share of KV blocks in use", ["role"])
WAITING = Gauge("baton_worker_requests_waiting", "Requests queued in the engine", ["role"])
ENGINE_RUNNING = Gauge("baton_worker_engine_requests_running", "Requests in the engine's running batch", ["role"])
PREEMPTIONS = Gauge("baton_worker_preemptions", "Preemptions since start (KV pool ran out)", ["role"])
PROMPT_TOKENS = Gauge("baton_worker_prompt_tokens", "Prompt tokens admitted since start", ["role"])
REMOTE_TIER_BLOCKS = Counter("baton_kv_remote_tier_blocks_total",
                             "G4: KV blocks pulled from peers' lower tiers, and served to peers", ["direction"])
PREFIX_HIT_TOKENS = Gauge("baton_worker_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache",
                          ["role"])


@dataclass
class DecodeSettings:
    nats_url: str = DEFAULT_NATS_URL
    engine: EngineConfig = field(default_factory=EngineConfig)
    worker_id: str | None = None
    served_model_name: str | None = None
    discovery_ttl: float = DEFAULT_TTL
    load_interval: float = 1.0
    kv_event_interval: float = 0.05
    max_inflight: int = 1024  # admission: beyond this a request gets 503 at once
    metrics_port: int = 0
    disagg: DisaggSettings = field(default_factory=DisaggSettings)
    kv_host: str = "127.0.0.1"  # address prefill workers use to reach our KV transport (advertised)
    kv_bind_host: str = ""  # address the KV transport listens on ("": see shared/kv_address.py)


class DecodeWorker:
    role = "decode"

    def __init__(self, settings: DecodeSettings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.worker_id = settings.worker_id or f"{self.role}-{uuid.uuid4().hex[:8]}"
        self.engine = engine or make_engine(settings.engine)
        self.bus: Bus | None = None
        self.registration: WorkerRegistration | None = None
        self._scopes: dict[str, anyio.CancelScope] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self.replies: ReplyBatcher | None = None  # batched replies to frontends that take them
        self._draining = False
        self._idle = anyio.Event()  # set when draining and the last request is done
        self._kv_seq = 0
        self.ready = False
        self.transport: KvTransport | None = None
        self.remote: RemotePrefill | None = None

    @property
    def model(self) -> str:
        return self.settings.served_model_name or self.engine.model_name or self.settings.engine.model

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            worker_id=self.worker_id, role=self.role, model=self.model,  # type: ignore[arg-type]
            generate_subject=subjects.generate(self.worker_id), cancel_subject=subjects.cancel(self.worker_id),
            kv_endpoint=self.transport.endpoint if self.transport is not None else "",
            block_size=self.engine.block_size, engine=self.engine.name, pid=os.getpid(), host=socket.gethostname(),
            started_at=time.time(),
        )

    async def run(self) -> None:
        self.bus = await Bus.connect(self.settings.nats_url, f"baton-{self.worker_id}")
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self.engine.run)
                if self.settings.metrics_port:
                    tg.start_soon(serve_metrics, self.settings.metrics_port, lambda: self.ready)
                await self.engine.wait_ready()
                remote_prefill = self.settings.disagg.enabled and self.engine.supports_remote_prefill
                if remote_prefill or self.engine.kv_tiers is not None:
                    # Remote prefill writes into our pool; G4 peers send tier blocks: both need it.
                    self.transport = make_transport(self.settings.disagg.transport,
                                                    advertised_host(self.settings.kv_host),
                                                    bind_host_for(self.settings.kv_host, self.settings.kv_bind_host),
                                                    KvTls.from_env())
                    await self.transport.start()
                    log.info("KV transport %s at %s", self.transport.name, self.transport.endpoint)
                    tg.start_soon(self.transport.run)
                if self.engine.kv_tiers is not None:
                    await self.bus.subscribe(subjects.kv_fetch(self.worker_id), self._on_kv_fetch)
                if remote_prefill:
                    view = WorkerView(self.bus, self.settings.discovery_ttl)
                    tg.start_soon(view.run)
                    self.remote = RemotePrefill(self.bus, self.engine, self.transport, view, self.worker_id,
                                                self.settings.disagg)
                    tg.start_soon(self.remote.run)
                self.replies = ReplyBatcher(self.bus)
                tg.start_soon(self.replies.run)
                await self.bus.subscribe(subjects.generate(self.worker_id), self._on_generate)
                await self.bus.subscribe(subjects.cancel(self.worker_id), self._on_cancel)
                await self.bus.subscribe(subjects.status(self.worker_id), self._on_status)
                await self.bus.subscribe(subjects.kv_resync(self.worker_id), self._on_kv_resync)
                self.registration = WorkerRegistration(self.bus, self.info(), self.settings.discovery_ttl)
                await self.registration.register()
                tg.start_soon(self.registration.run)
                tg.start_soon(self._report_load)
                tg.start_soon(self._publish_kv_events)
                self.ready = True
                settle_heap()  # the engine, its pools and connections stay out of the collector's way
                log.info("%s serving %s with the %s engine", self.worker_id, self.model, self.engine.name)
        finally:
            self.ready = False
            await self.bus.close()

    async def drain(self) -> None:
        """Deregister so no new work arrives, let in-flight requests finish, then return."""
        self._draining = True
        if self.registration is not None:
            await self.registration.withdraw()
        if self._scopes:
            await self._idle.wait()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    # --- handlers ------------------------------------------------------------------------

    async def _on_generate(self, msg: Msg) -> None:
        assert self._tg is not None
        self._tg.start_soon(self._serve, msg)

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            cancel = cancel_decoder.decode(msg.data)
        except Exception:
            return
        scope = self._scopes.get(cancel.request_id)
        if scope is not None:
            log.debug("cancelling %s: %s", cancel.request_id, cancel.reason)
            scope.cancel()

    # --- G4: lower-tier blocks between workers ------------------------------------------

    async def _on_kv_fetch(self, msg: Msg) -> None:
        # Its own task: a send to one peer must not hold up the next peer's fetch.
        assert self._tg is not None
        self._tg.start_soon(self._serve_kv_fetch, msg)

    async def _serve_kv_fetch(self, msg: Msg) -> None:
        """A peer pulls blocks from our host/disk tiers: first how many we hold, then the bytes."""
        assert self.bus is not None
        tiers = self.engine.kv_tiers
        try:
            req = kv_fetch_request_decoder.decode(msg.data)
            if req.kv_layout != self.engine.kv_layout():
                raise ValueError(f"KV layout mismatch: {req.kv_layout!r} vs {self.engine.kv_layout()!r}")
            if not req.send:
                await self.bus.respond(msg, KvFetchReply(available=tiers.leading_available(req.block_hashes)))
                return
            # Disk reads and checksums happen off the event loop.
            found = await anyio.to_thread.run_sync(lambda: [tiers.lookup(h) for h in req.block_hashes])
            if any(f is None for f in found):
                raise ValueError("blocks left our tiers meanwhile")
            blocks = [memoryview(f[1]) for f in found]
            assert self.transport is not None
            await self.transport.send(req.endpoint, req.transfer_id, blocks, timeout=10, token=req.token)
            REMOTE_TIER_BLOCKS.labels("served").inc(len(blocks))
            await self.bus.respond(msg, KvFetchReply(sent=len(blocks)))
        except Exception as e:  # a bad or stale fetch costs the peer a recompute, nothing more
            await self.bus.respond(msg, KvFetchReply(error=str(e)))

    async def _pull_from_peer(self, req: GenerateRequest) -> int:
        """Before admission: copy the prompt's blocks that ``req.kv_source`` holds in its lower tiers
        (and we hold nowhere) into our host tier, so the prefix lookup onboards them. Best effort:
        any failure just means those blocks are computed."""
        assert self.bus is not None and self.transport is not None
        bs = self.engine.block_size
        full = (len(req.token_ids) - 1) // bs
        ours = self.engine.cached_prefix_tokens(req.token_ids) // bs
        want = block_hashes(req.token_ids[: full * bs], bs)[ours : min(full, req.kv_source_blocks)]
        if not want:
            return 0
        layout = self.engine.kv_layout()
        subject = subjects.kv_fetch(req.kv_source)
        try:
            probe = kv_fetch_reply_decoder.decode((await self.bus.request(
                subject, KvFetchRequest(transfer_id="", block_hashes=want, kv_layout=layout), timeout=1.0)).data)
            n = probe.available
            if probe.error or n == 0:
                return 0
            block_bytes = sum(len(v) for v in self.engine.kv_views([0]))
            bufs = [bytearray(block_bytes) for _ in range(n)]
            tid = f"g4-{req.request_id}"
            token = self.transport.expect(tid, [memoryview(b) for b in bufs]).token
            try:
                reply = kv_fetch_reply_decoder.decode((await self.bus.request(subject, KvFetchRequest(
                    transfer_id=tid, block_hashes=want[:n], kv_layout=layout, endpoint=self.transport.endpoint,
                    token=token, send=True), timeout=10.0)).data)
                if reply.error or reply.sent != n:
                    raise RuntimeError(reply.error or f"peer sent {reply.sent} of {n} blocks")
                await self.transport.wait(tid, timeout=5)
            finally:
                self.transport.forget(tid)
        except Exception as e:
            log.info("pulling %d blocks from %s failed (%r); computing them", len(want), req.kv_source, e)
            return 0
        # Storing may demote blocks to disk: off the event loop.
        pairs = list(zip(want[:n], map(bytes, bufs), strict=True))
        await anyio.to_thread.run_sync(self.engine.kv_tiers.import_blocks, pairs)
        REMOTE_TIER_BLOCKS.labels("pulled").inc(n)
        return n

    async def _on_kv_resync(self, msg: Msg) -> None:
        """A router lost some of our KV events: resend our whole cache as one cleared batch."""
        hashes = self.engine.cached_block_hashes()
        if hashes is None:  # engines without the shared KV manager: routers re-learn from new events
            return
        self.engine.kv_events.record_cleared()
        self.engine.kv_events.record_stored(hashes, None)

    async def _on_status(self, msg: Msg) -> None:
        assert self.bus is not None
        try:
            asked = status_request_decoder.decode(msg.data).request_ids
        except Exception:
            asked = []
        known = [rid for rid in asked if rid in self._scopes]
        await self.bus.respond(msg, StatusReply(worker_id=self.worker_id, known=known, draining=self._draining))

    def _validate(self, req: GenerateRequest) -> str | None:
        if req.model and req.model != self.model:
            return f"this worker serves {self.model!r}, not {req.model!r}"
        if not req.token_ids:
            return "the prompt is empty"
        if req.sampling.max_tokens < 1:
            return "max_tokens must be at least 1"
        if not 1 <= req.sampling.n <= MAX_N_HARD:
            return f"n must be between 1 and {MAX_N_HARD}"
        vocab = getattr(self.engine, "vocab_size", 0)
        if vocab and (min(req.token_ids) < 0 or max(req.token_ids) >= vocab):
            return f"token ids must be in [0, {vocab})"
        max_len = getattr(self.engine, "max_model_len", 0)
        if max_len and len(req.token_ids) + req.sampling.max_tokens > max_len:
            return f"prompt plus max_tokens exceeds the context length {max_len}"
        if req.request_id in self._scopes:
            return f"duplicate request id {req.request_id!r}"
        return None

    async def _serve(self, msg: Msg) -> None:
        assert self.bus is not None
        reply = msg.reply
        try:
            req = generate_request_decoder.decode(msg.data)
        except Exception as e:
            REQUESTS.labels(self.role, "bad_request").inc()
            if reply:
                await self.bus.publish(reply, GenerateError(request_id="", code=400, message=f"undecodable request: {e}"))
            return
        if not reply:
            return
        # This task's log lines (here and in the disagg/engine code it calls) carry the request id.
        bind_request(req.request_id, tracing.trace_id_from_headers(msg.headers))
        send = self._sender(req, reply)
        if self._draining or len(self._scopes) >= self.settings.max_inflight:
            REQUESTS.labels(self.role, "rejected").inc()
            await send(GenerateError(request_id=req.request_id, code=503, message=f"{self.worker_id} is draining or full"))
            return
        problem = self._validate(req)
        if problem:
            REQUESTS.labels(self.role, "bad_request").inc()
            await send(GenerateError(request_id=req.request_id, code=400, message=problem))
            return
        span = tracing.start("decode", tracing.SpanKind.SERVER, tracing.context_from(msg.headers), **{
            "baton.request_id": req.request_id, "baton.worker_id": self.worker_id,
            "gen_ai.request.model": self.model, "gen_ai.request.max_tokens": req.sampling.max_tokens,
            "gen_ai.usage.input_tokens": len(req.token_ids)})
        if span is not None:
            bind_request(req.request_id, tracing.trace_id_of(span))
        log.debug("generate: %d prompt tokens, max_tokens %d", len(req.token_ids), req.sampling.max_tokens)
        scope = anyio.CancelScope()
        if req.deadline:
            scope.deadline = anyio.current_time() + max(0.0, req.deadline - time.time())
        self._scopes[req.request_id] = scope
        RUNNING.labels(self.role).inc()
        outcome = "cancelled"
        try:
            with scope:
                outcome = await self._stream(req, send, span)
        except Exception as e:
            outcome = "error"
            log.exception("request %s failed", req.request_id)
            with anyio.move_on_after(1, shield=True):
                await send(GenerateError(request_id=req.request_id, code=500, message=f"engine error: {e!r}"))
        finally:
            log.debug("generate finished: %s", outcome)
            tracing.end(span, error=None if outcome in ("length", "stop") else outcome,
                        **{"gen_ai.response.finish_reasons": [outcome]})
            self._scopes.pop(req.request_id, None)
            if self._draining and not self._scopes:
                self._idle.set()
            RUNNING.labels(self.role).dec()
            REQUESTS.labels(self.role, outcome).inc()

    def _sender(self, req: GenerateRequest, reply: str) -> Callable[[TokenChunk | GenerateError], Awaitable[None]]:
        """How this request's replies leave: batched with the step's other replies to the same
        frontend when it takes batches (``batch_reply``), else one message each to ``reply``."""
        batcher = self.replies
        if req.batch_reply and batcher is not None:
            subject = req.batch_reply

            async def batched(r: TokenChunk | GenerateError) -> None:
                batcher.send(subject, r)
            return batched
        bus = self.bus
        assert bus is not None

        async def single(r: TokenChunk | GenerateError) -> None:
            await bus.publish(reply, r)
        return single

    async def _stream(self, req: GenerateRequest, publish: Callable[[TokenChunk | GenerateError], Awaitable[None]],
                      span: Any = None) -> str:
        """Stream the engine's outputs as TokenChunks, per choice (``n > 1``); not streamed, one
        final chunk per choice. The request's last chunk carries the usage, prompt counted once."""
        rid = req.request_id
        sp = req.sampling
        n = max(1, sp.n)
        index = [0] * n  # tokens sent (or held) so far, per choice
        held: list[list[int]] = [[] for _ in range(n)]  # non-streaming: coalesced per choice
        held_lp: list[list[PositionLogprobs]] = [[] for _ in range(n)]
        prompt_lp: list[PositionLogprobs] = []
        open_choices = n
        last_reason = "ended"
        outputs = None
        if (req.kv_source and req.kv_source != self.worker_id and self.engine.kv_tiers is not None
                and self.transport is not None):
            pulled = await self._pull_from_peer(req)
            tracing.event(span, "kv_pulled_from_peer", **{"baton.kv_source": req.kv_source, "baton.blocks": pulled})
        # n > 1 and prompt logprobs run locally: a remote prefill returns one first token and no
        # prompt logprobs.
        if self.remote is not None and n == 1 and sp.prompt_logprobs < 0:
            decision = self.remote.decide(req.token_ids)
            if decision == "remote":
                first = await self.remote.prefill(rid, req.token_ids, sp, span)
                if first is not None:
                    outputs = self.engine.generate_after_remote_prefill(rid, req.token_ids, sp, first)
            else:
                DISAGG_DECISIONS.labels(decision).inc()
        if outputs is None:
            outputs = self.engine.generate(rid, req.token_ids, sp)
        async for out in outputs:
            if out.error:
                await publish(GenerateError(request_id=rid, code=400, message=out.error))
                return "bad_request"
            c = out.choice if 0 <= out.choice < n else 0
            if sum(index) == 0 and out.token_ids:
                tracing.event(span, "first_token", **{"baton.cached_tokens": out.num_cached_tokens})
            if out.prompt_logprobs:
                prompt_lp = out.prompt_logprobs
            lps = out.logprobs or []
            if out.finish_reason is not None:
                whole = out.finish_reason in ("abort", "error")  # ends every choice at once
                open_choices = 0 if whole else open_choices - 1
                last_reason = out.finish_reason
                usage = None
                if open_choices <= 0:
                    usage = Usage(prompt_tokens=out.num_prompt_tokens or len(req.token_ids),
                                  completion_tokens=sum(index) + len(out.token_ids),
                                  cached_tokens=out.num_cached_tokens)
                    if span is not None:
                        span.set_attributes({"gen_ai.usage.output_tokens": usage.completion_tokens,
                                             "baton.cached_tokens": out.num_cached_tokens})
                tokens = held[c] + out.token_ids if not req.stream else out.token_ids
                start = 0 if not req.stream else index[c]
                index[c] += len(out.token_ids)
                await publish(TokenChunk(
                    request_id=rid, index=start, token_ids=tokens, finish_reason=out.finish_reason,  # type: ignore[arg-type]
                    usage=usage, choice=c, logprobs=held_lp[c] + lps if not req.stream else lps,
                    prompt_logprobs=prompt_lp))
                prompt_lp = []
                if open_choices <= 0:
                    return out.finish_reason
                continue
            if req.stream:
                if out.token_ids:
                    await publish(TokenChunk(request_id=rid, index=index[c], token_ids=out.token_ids, choice=c,
                                                    logprobs=lps, prompt_logprobs=prompt_lp))
                    prompt_lp = []
            else:
                held[c].extend(out.token_ids)
                held_lp[c].extend(lps)
            index[c] += len(out.token_ids)
        return last_reason if open_choices <= 0 else "ended"

    # --- periodic reports ----------------------------------------------------------------

    async def _report_load(self) -> None:
        assert self.bus is not None
        subject = subjects.load(self.worker_id)
        while True:
            st = self.engine.stats()
            KV_USED.labels(self.role).set(st.kv_blocks_used)
            KV_TOTAL.labels(self.role).set(st.kv_blocks_total)
            KV_USAGE.labels(self.role).set(st.kv_blocks_used / st.kv_blocks_total if st.kv_blocks_total else 0.0)
            WAITING.labels(self.role).set(st.waiting)
            ENGINE_RUNNING.labels(self.role).set(st.running)
            PREEMPTIONS.labels(self.role).set(st.preemptions)
            PROMPT_TOKENS.labels(self.role).set(st.prompt_tokens)
            PREFIX_HIT_TOKENS.labels(self.role).set(st.prefix_hit_tokens)
            if self.engine.kv_tiers is not None:
                self.engine.kv_tiers.update_gauges()
            report = LoadReport(
                worker_id=self.worker_id, role=self.role, timestamp=time.time(),  # type: ignore[arg-type]
                kv_blocks_used=st.kv_blocks_used, kv_blocks_total=st.kv_blocks_total, running=st.running,
                waiting=st.waiting, prefill_tokens_queued=st.prefill_tokens_queued,
            )
            try:
                await self.bus.publish(subject, report)
            except Exception as e:
                log.debug("load report failed: %r", e)
            await anyio.sleep(self.settings.load_interval)

    async def _publish_kv_events(self) -> None:
        """Every interval, one batch per tier that changed: device (1), host (2), disk (3)."""
        assert self.bus is not None
        subject = subjects.kv_events(self.worker_id)
        while True:
            await anyio.sleep(self.settings.kv_event_interval)
            for tier, buffer in ((1, self.engine.kv_events), *self.engine.tier_events.items()):
                stored, removed, cleared = buffer.drain()
                if not (stored or removed or cleared):
                    continue
                self._kv_seq += 1
                batch = KvEventBatch(worker_id=self.worker_id, seq=self._kv_seq, stored=stored, removed=removed,
                                     cleared=cleared, tier=tier)
                try:
                    await self.bus.publish(subject, batch)
                except Exception as e:
                    log.debug("kv event publish failed: %r", e)
