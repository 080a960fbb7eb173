"""The decode worker: takes generate requests on its own subject and streams tokens back.

It stands on :class:`shared.worker_host.WorkerHost` (engine, bus, registration, load reports, KV
events, drain) and adds the request handling. A request runs as a task in the worker's task
group (but see below); a Cancel message or a deadline cancels it, and the engine frees its KV
blocks when its stream is closed. A plain request is handed to the engine by the job
subscription's handler, before its task starts (``_submit_early``); one whose replies the
engine's listener can send (one choice, to a batching frontend) gets no task at all: the
listener sends every chunk and ends it (``_finish_taskless``). One request's chunks are shaped
in ``replies.py``, remote prefill lives in ``disagg.py``, the G4 peer block fetch in
``peer_fetch.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge

from services.decode.disagg import DisaggSettings, RemotePrefill, count_decision
from services.decode.peer_fetch import PeerBlocks
from services.decode.replies import RequestReplies
from shared import probe, subjects, tracing
from shared.bus import ReplyBatcher
from shared.discovery import WorkerView
from shared.engines import Engine
from shared.engines.adapters import AdapterBusyError, UnknownAdapterError
from shared.engines.base import EngineOutput, SubmittedStream
from shared.messages import (
    GenerateError,
    GenerateRequest,
    LoraLoad,
    LoraReply,
    StatusReply,
    TokenChunk,
    cancel_decoder,
    generate_request_decoder,
    lora_command_decoder,
    status_request_decoder,
)
from shared.telemetry import bind_request
from shared.worker_host import WorkerHost, WorkerSettings

log = logging.getLogger("baton.decode")

REQUESTS = Counter("baton_worker_requests_total", "Requests by outcome", ["role", "outcome"])
RUNNING = Gauge("baton_worker_requests_running", "Requests in flight", ["role"])


@dataclass(slots=True)
class EarlyRequest:
    """A request handed to the engine from the NATS read loop, for its task to take over, or
    (``taskless``) served by the engine's listener alone until it ends."""

    req: GenerateRequest
    outputs: SubmittedStream | None  # None until submit_now returns
    replies: RequestReplies
    # A Cancel that comes before the task starts cancels this; None when taskless (no task to
    # cancel: _finish_taskless ends it): anyio makes each one through a backend lookup, per request.
    scope: anyio.CancelScope | None
    taskless: bool = False
    outcome: str = ""  # taskless: how it ended, once it has
    timer: asyncio.TimerHandle | None = None  # taskless, with a deadline: its expiry
    settled: bool = False  # taskless: ended and cleaned up


# Taskless outcomes after which the engine surely holds nothing of the request; after any other
# (an abort or an error may also be the listener's own failure) it is aborted, a no-op if gone.
_ENDED_IN_ENGINE = frozenset({"length", "stop"})


@dataclass
class DecodeSettings(WorkerSettings):
    max_inflight: int = 1024  # admission: beyond this a request gets 503 at once
    stream_interval: float = 0.001  # seconds between flushes of middle tokens (shared.bus.ReplyBatcher)
    disagg: DisaggSettings = field(default_factory=DisaggSettings)


class DecodeWorker(WorkerHost):
    role = "decode"
    settings: DecodeSettings

    def __init__(self, settings: DecodeSettings, engine: Engine | None = None) -> None:
        super().__init__(settings, engine)
        self._scopes: dict[str, anyio.CancelScope] = {}
        self._early: dict[str, EarlyRequest] = {}  # submitted from the read loop, task not started yet
        self.remote: RemotePrefill | None = None
        self.peers: PeerBlocks | None = None
        self.replies: ReplyBatcher | None = None  # batched replies to the frontends that take them
        # Metric children looked up once, not per request (labels() costs a lock and a dict walk).
        self._running_gauge = RUNNING.labels(self.role)
        self._outcomes: dict[str, Any] = {}

    def _count(self, outcome: str) -> None:
        child = self._outcomes.get(outcome)
        if child is None:
            child = self._outcomes[outcome] = REQUESTS.labels(self.role, outcome)
        child.inc()

    def _remote_prefill(self) -> bool:
        return self.settings.disagg.enabled and self.engine.supports_remote_prefill

    def wants_transport(self) -> bool:
        # Remote prefill writes into our pool; G4 peers send tier blocks: both need it.
        return self._remote_prefill() or self.engine.kv_tiers is not None

    def info_fields(self) -> dict[str, str]:
        return {"generate_subject": subjects.generate(self.worker_id), "cancel_subject": subjects.cancel(self.worker_id),
                "kv_endpoint": self.transport.endpoint if self.transport is not None else ""}

    async def serve(self, tg: anyio.abc.TaskGroup) -> None:
        assert self.bus is not None
        if self.engine.kv_tiers is not None:
            assert self.transport is not None
            self.peers = PeerBlocks(self.bus, self.engine, self.transport, self.worker_id)
            await self.bus.subscribe(subjects.kv_fetch(self.worker_id), self._on_kv_fetch)
        if self._remote_prefill():
            assert self.transport is not None
            view = WorkerView(self.bus, self.settings.discovery_ttl)
            tg.start_soon(view.run)
            self.remote = RemotePrefill(self.bus, self.engine, self.transport, view, self.worker_id,
                                        self.settings.disagg)
            tg.start_soon(self.remote.run)
        self.replies = ReplyBatcher(self.bus, self.settings.stream_interval)
        tg.start_soon(self.replies.run)
        # First and last tokens leave in the turn of the step that made them.
        self.replies.flushed_by_caller = self.engine.on_delivered(self.replies.flush_urgent_now)
        # Straight from the client's read loop: one event-loop turn less per job and per cancel.
        await self.bus.subscribe_direct(subjects.generate(self.worker_id), self._on_generate)
        await self.bus.subscribe_direct(subjects.cancel(self.worker_id), self._on_cancel)
        await self.bus.subscribe(subjects.status(self.worker_id), self._on_status)
        await self.bus.subscribe(subjects.kv_resync(self.worker_id), self._on_kv_resync)
        await self.bus.subscribe(subjects.lora(self.worker_id), self._on_lora)

    # --- handlers ------------------------------------------------------------------------

    def _on_generate(self, msg: Msg) -> None:
        assert self._tg is not None
        if probe.on:  # the TTFT probe (shared/probe.py)
            probe.arrived(msg)
        try:
            early = self._submit_early(msg)
        except Exception:  # the task takes the request the usual way, and reports what fails
            log.exception("early submit failed")
            early = None
        if early is not None and early.taskless:
            return  # the engine's listener serves it to the end (_finish_taskless)
        self._tg.start_soon(self._serve, msg, early)

    def _on_cancel(self, msg: Msg) -> None:
        try:
            cancel = cancel_decoder.decode(msg.data)
        except Exception:
            return
        scope = self._scopes.get(cancel.request_id)
        if scope is None and cancel.request_id in self._early:  # its task has not started yet (or has none)
            early = self._early[cancel.request_id]
            if early.taskless:
                log.debug("cancelling %s: %s", cancel.request_id, cancel.reason)
                self._finish_taskless(early, "cancelled")
                return
            scope = early.scope
        if scope is not None:
            log.debug("cancelling %s: %s", cancel.request_id, cancel.reason)
            scope.cancel()

    async def _on_kv_fetch(self, msg: Msg) -> None:
        # Its own task: a send to one peer must not hold up the next peer's fetch.
        assert self._tg is not None and self.peers is not None
        self._tg.start_soon(self.peers.serve, msg)

    async def _on_kv_resync(self, msg: Msg) -> None:
        """A router lost some of our KV events: resend our whole cache as one cleared batch."""
        hashes = self.engine.cached_block_hashes()
        if hashes is None:  # engines without the shared KV manager: routers re-learn from new events
            return
        self.engine.kv_events.record_cleared()
        self.engine.kv_events.record_stored(hashes, None)

    async def _on_lora(self, msg: Msg) -> None:
        """Load or unload a LoRA adapter (the frontend asks every worker of its base model). The
        path was checked by the frontend against its adapter root; the engine validates the files
        against the model. A bad adapter is refused (400) and nothing else changes."""
        assert self.bus is not None
        try:
            cmd = lora_command_decoder.decode(msg.data)
        except Exception as e:
            await self.bus.respond(msg, LoraReply(code=400, message=f"undecodable LoRA command: {e}",
                                                  worker_id=self.worker_id))
            return
        reply = LoraReply(worker_id=self.worker_id)
        try:
            if isinstance(cmd, LoraLoad):
                reply.digest = await self.engine.load_lora(cmd.lora_name, cmd.lora_path)
                reply.message = f"adapter {cmd.lora_name!r} loaded"
            else:
                await self.engine.unload_lora(cmd.lora_name)
                reply.message = f"adapter {cmd.lora_name!r} unloaded"
            log.info("%s", reply.message)
        except UnknownAdapterError as e:
            reply.code, reply.message = 404, str(e)
        except AdapterBusyError as e:
            reply.code, reply.message = 503, str(e)
        except ValueError as e:  # LoraError: does not fit this model, unreadable files
            reply.code, reply.message = 400, str(e)
        except Exception as e:
            log.exception("LoRA command failed")
            reply.code, reply.message = 500, f"LoRA command failed: {e!r}"
        if reply.code == 200:
            with anyio.move_on_after(3):  # the adapter list in discovery; the refresh retries anyway
                try:
                    await self.advertise()
                except Exception as e:
                    log.warning("advertising adapters failed: %r", e)
        await self.bus.respond(msg, reply)

    async def _on_status(self, msg: Msg) -> None:
        assert self.bus is not None
        try:
            asked = status_request_decoder.decode(msg.data).request_ids
        except Exception:
            asked = []
        known = [rid for rid in asked if rid in self._scopes or rid in self._early]
        await self.bus.respond(msg, StatusReply(worker_id=self.worker_id, known=known, draining=self.draining))

    def _validate(self, req: GenerateRequest) -> str | None:
        """What only this worker can judge: its model, its vocabulary, its context length. The
        sampling fields were validated by the frontend, and the engine checks its own limits."""
        if req.model and req.model != self.model:
            return f"this worker serves {self.model!r}, not {req.model!r}"
        if not req.token_ids:
            return "the prompt is empty"
        vocab = getattr(self.engine, "vocab_size", 0)
        if vocab and (min(req.token_ids) < 0 or max(req.token_ids) >= vocab):
            return f"token ids must be in [0, {vocab})"
        max_len = getattr(self.engine, "max_model_len", 0)
        if max_len and len(req.token_ids) + req.sampling.max_tokens > max_len:
            return f"prompt plus max_tokens exceeds the context length {max_len}"
        if req.request_id in self._scopes:
            return f"duplicate request id {req.request_id!r}"
        return None

    async def _serve(self, msg: Msg, early: EarlyRequest | None = None) -> None:
        assert self.bus is not None
        reply = msg.reply
        if early is not None:  # decoded, checked and with the engine already
            req = early.req
            self._early.pop(req.request_id, None)
            bind_request(req.request_id, tracing.trace_id_from_headers(msg.headers))
            send = self._sender(req, reply)
        else:
            try:
                req = generate_request_decoder.decode(msg.data)
                if probe.on:
                    probe.decoded(msg, req.request_id)
            except Exception as e:
                self._count("bad_request")
                if reply:
                    await self.bus.publish(reply, GenerateError(request_id="", code=400,
                                                                message=f"undecodable request: {e}"))
                return
            if not reply:
                return
            # This task's log lines (here and in the disagg/engine code it calls) carry the request id.
            bind_request(req.request_id, tracing.trace_id_from_headers(msg.headers))
            send = self._sender(req, reply)
            if self.draining or len(self._scopes) + len(self._early) >= self.settings.max_inflight:
                self._count("rejected")
                await send(GenerateError(request_id=req.request_id, code=503,
                                         message=f"{self.worker_id} is draining or full"))
                return
            problem = self._validate(req)
            if problem:
                self._count("bad_request")
                await send(GenerateError(request_id=req.request_id, code=400, message=problem))
                return
        span = None
        if tracing.ENABLED:
            span = tracing.start("decode", tracing.SpanKind.SERVER, tracing.context_from(msg.headers), **{
                "baton.request_id": req.request_id, "baton.worker_id": self.worker_id,
                "gen_ai.request.model": self.model, "gen_ai.request.max_tokens": req.sampling.max_tokens,
                "gen_ai.usage.input_tokens": len(req.token_ids)})
            if span is not None:
                bind_request(req.request_id, tracing.trace_id_of(span))
        log.debug("generate: %d prompt tokens, max_tokens %d", len(req.token_ids), req.sampling.max_tokens)
        scope = early.scope if early is not None and early.scope is not None else anyio.CancelScope()
        if req.deadline:
            scope.deadline = anyio.current_time() + max(0.0, req.deadline - time.time())
        self._scopes[req.request_id] = scope
        if early is None:
            self.begin()  # (an early request began when it was submitted)
        self._running_gauge.inc()
        outcome = "cancelled"
        try:
            with scope:
                outcome = await self._stream(req, send, span, early)
        except Exception as e:
            outcome = "error"
            log.exception("request %s failed", req.request_id)
            with anyio.move_on_after(1, shield=True):
                await send(GenerateError(request_id=req.request_id, code=500, message=f"engine error: {e!r}"))
        finally:
            log.debug("generate finished: %s", outcome)
            if span is not None:
                tracing.end(span, error=None if outcome in ("length", "stop") else outcome,
                            **{"gen_ai.response.finish_reasons": [outcome]})
            self._scopes.pop(req.request_id, None)
            self.engine.listen(req.request_id, None)
            self.end()
            self._running_gauge.dec()
            self._count(outcome)

    def _sender(self, req: GenerateRequest, reply: str) -> Callable[[TokenChunk | GenerateError], Awaitable[None]]:
        """How this request's replies leave: batched with the other replies of the loop turn (one
        engine step) to the same frontend when it takes batches (``batch_reply``), else one
        message each to ``reply``."""
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
                      span: Any = None, early: EarlyRequest | None = None) -> str:
        """Stream the engine's outputs as TokenChunks, per choice (``n > 1``); not streamed, one
        final chunk per choice. The request's last chunk carries the usage, prompt counted once.
        ``early``: the request went to the engine from the read loop already."""
        rid = req.request_id
        sp = req.sampling
        n = max(1, sp.n)
        open_choices = n
        last_reason = "ended"
        if early is not None:
            replies, outputs = early.replies, early.outputs
            replies.span = span
        else:
            replies = RequestReplies(req, self.replies, span)
            outputs = await self._generate(req, span)
            if probe.on:
                probe.mark("engine_submit", rid)
            if replies.listens:
                self.engine.listen(rid, replies.on_output)
        try:
            async for out in outputs:
                if replies.sent_last:
                    return replies.sent_last
                if out.error:
                    await publish(GenerateError(request_id=rid, code=out.error_code, message=out.error))
                    return "bad_request"
                c = out.choice if 0 <= out.choice < n else 0
                if sum(replies.index) == 0 and out.token_ids:
                    replies.first_token(out)
                if out.prompt_logprobs:
                    replies.prompt_logprobs = out.prompt_logprobs
                if out.finish_reason is not None:
                    whole = out.finish_reason in ("abort", "error")  # ends every choice at once
                    open_choices = 0 if whole else open_choices - 1
                    last_reason = out.finish_reason
                    await publish(replies.last_chunk(out, c, replies.usage(out) if open_choices <= 0 else None))
                    if open_choices <= 0:
                        return out.finish_reason
                    continue
                if req.stream:
                    if out.token_ids:
                        await publish(replies.middle_chunk(out, c))
                else:
                    replies.hold(out, c)
            return last_reason if open_choices <= 0 else "ended"
        finally:
            if isinstance(outputs, SubmittedStream):
                outputs.close()

    async def _generate(self, req: GenerateRequest, span: Any) -> AsyncIterator[EngineOutput]:
        """Hand the request to the engine: after a pull of its prefix from a peer's lower tier, or
        a prefill on a prefill worker, where those apply."""
        rid = req.request_id
        sp = req.sampling
        # LoRA requests run locally: remote prefill and peer block pulls hash and compute for the
        # base model only.
        if self.peers is not None and not req.lora and self.peers.wants_pull(req):
            pulled = await self.peers.pull(req)
            tracing.event(span, "kv_pulled_from_peer", **{"baton.kv_source": req.kv_source, "baton.blocks": pulled})
        # n > 1 and prompt logprobs run locally: a remote prefill returns one first token and no
        # prompt logprobs.
        if self.remote is not None and max(1, sp.n) == 1 and sp.prompt_logprobs < 0 and not req.lora:
            decision = self.remote.decide(req.token_ids)
            if decision == "remote":
                first = await self.remote.prefill(rid, req.token_ids, sp, span)
                if first is not None:
                    return self.engine.generate_after_remote_prefill(rid, req.token_ids, sp, first)
            else:
                count_decision(decision)
        if req.lora:
            return self.engine.generate(rid, req.token_ids, sp, lora=req.lora)
        return self.engine.generate(rid, req.token_ids, sp)

    def _submit_early(self, msg: Msg) -> EarlyRequest | None:
        """From the read loop, before the request's task exists: hand a plain request (local, no
        grammar to compile, nothing to pull first) to the engine now, so its prefill need not wait
        for the task's first turn (a whole busy loop turn under load). Anything unusual, invalid
        or refused returns None, and the task does it all as before (and reports the problem)."""
        if not msg.reply or self.draining or tracing.ENABLED or self.replies is None:
            return None
        try:
            req = generate_request_decoder.decode(msg.data)
        except Exception:
            return None
        rid = req.request_id
        if (len(self._scopes) + len(self._early) >= self.settings.max_inflight or rid in self._early
                or self._validate(req) is not None):
            return None
        sp = req.sampling
        if sp.structured is not None or (self.peers is not None and not req.lora and self.peers.wants_pull(req)):
            return None
        if self.remote is not None and max(1, sp.n) == 1 and sp.prompt_logprobs < 0 and not req.lora:
            decision = self.remote.decide(req.token_ids)
            if decision == "remote":
                return None  # the task prefills elsewhere (deciding again: the load may have moved)
            count_decision(decision)
        replies = RequestReplies(req, self.replies)
        early = EarlyRequest(req, None, replies, None)
        # Before the submit: the listener must see the request's first output. One that can send
        # every reply itself (a batching frontend) leaves the request no task to wake.
        if replies.listens and self.engine.listen(rid, replies.on_output) and replies.batcher is not None:
            early.taskless = True
            replies.on_done = lambda outcome: self._finish_taskless(early, outcome)
        else:
            early.scope = anyio.CancelScope()
        try:
            outputs = self.engine.submit_now(rid, req.token_ids, sp, lora=req.lora)
        finally:
            if probe.on:
                probe.decoded(msg, rid)
        if outputs is None:
            self.engine.listen(rid, None)
            return None
        if probe.on:
            probe.mark("engine_submit", rid)
        early.outputs = outputs
        if early.outcome:  # refused at once (e.g. an unknown adapter), its error already sent
            self._finish_taskless(early, early.outcome)
            return early
        self._early[rid] = early
        self.begin()  # in flight from now: a drain must wait for it even before its task starts
        if early.taskless:
            self._running_gauge.inc()
            if req.deadline:
                early.timer = asyncio.get_running_loop().call_later(
                    max(0.0, req.deadline - time.time()), self._finish_taskless, early, "cancelled")
        return early

    def _finish_taskless(self, early: EarlyRequest, outcome: str) -> None:
        """End a request served without a task, once: it finished (its last reply sent), failed
        (its error sent), or was cancelled or ran past its deadline (nothing sent: its frontend
        left). Later calls (a Cancel that crossed its last reply) do nothing."""
        if not early.outcome:
            early.outcome = outcome
        outputs = early.outputs
        if outputs is None or early.settled:  # None: ended inside submit_now, which comes back here
            return
        early.settled = True
        if early.outcome in _ENDED_IN_ENGINE:
            outputs.detach()
        else:
            outputs.close()  # aborts it in the engine (and stops its listener)
        early.replies.on_done = None
        if early.timer is not None:
            early.timer.cancel()
            early.timer = None
        if self._early.get(early.req.request_id) is early:  # in flight until now
            del self._early[early.req.request_id]
            self.end()
            self._running_gauge.dec()
        self._count(early.outcome)
