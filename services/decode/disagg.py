"""Conditional disaggregation on the decode worker: prefill here, or hand the prompt to a
prefill worker and receive its KV cache straight into reserved blocks.

Remote prefill is chosen only when it pays: the prompt's uncached part (after this worker's own
prefix hit) is at least ``min_tokens``, a prefill worker is registered, and the prefill queue
holds fewer than ``max_queue`` jobs. The two limits live in the JetStream KV bucket
``baton_config`` (key ``disagg``, JSON ``{"min_tokens": N, "max_queue": M}``), so operators can
change them at run time; every decision is counted.

A remote prefill that fails or misses its deadline falls back to local prefill; the reserved
blocks are always given back.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import anyio
from prometheus_client import Counter, Gauge

from shared import subjects, tracing
from shared.bus import Bus
from shared.discovery import WorkerView
from shared.engines import Engine
from shared.kv_transport import KvTransport, TransferError
from shared.messages import PrefillDone, PrefillJob, SamplingParams, encode, prefill_reply_decoder
from shared.streams import (
    config_bucket,
    ensure_prefill_queue,
    prefill_queue_depth,
    publish_prefill_job,
    watch_key,
)

log = logging.getLogger("baton.decode.disagg")

DISAGG_KEY = "disagg"

DECISIONS = Counter("baton_disagg_decisions_total", "Where prompts were prefilled, and why", ["decision"])
_DECISION_CHILDREN: dict[str, Any] = {}


def count_decision(decision: str) -> None:
    """Count one decision (its metric child looked up once: this runs for every request)."""
    child = _DECISION_CHILDREN.get(decision)
    if child is None:
        child = _DECISION_CHILDREN[decision] = DECISIONS.labels(decision)
    child.inc()


REMOTE_SECONDS = Gauge("baton_disagg_last_remote_prefill_seconds", "Wall time of the last remote prefill")


@dataclass
class DisaggSettings:
    enabled: bool = True
    min_tokens: int = 256  # uncached prompt tokens below this prefill locally
    max_queue: int = 32  # prefill jobs waiting beyond this: prefill locally
    prefill_timeout: float = 30.0  # a remote prefill not done by then falls back to local


class RemotePrefill:
    def __init__(self, bus: Bus, engine: Engine, transport: KvTransport, view: WorkerView, worker_id: str,
                 settings: DisaggSettings) -> None:
        self.bus = bus
        self.engine = engine
        self.transport = transport
        self.view = view
        self.worker_id = worker_id
        self.settings = settings
        self._queue_depth = 0
        self._queue_checked = 0.0

    async def run(self) -> None:
        """Keep the queue depth and the run-time limits current."""
        await ensure_prefill_queue(self.bus)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_config)
            while True:
                await self._refresh_queue_depth()
                await anyio.sleep(0.5)

    async def _refresh_queue_depth(self) -> None:
        try:
            self._queue_depth, _ = await prefill_queue_depth(self.bus, timeout=2)
            self._queue_checked = time.monotonic()
        except Exception as e:  # no consumer yet, or NATS away: decide with what we know
            log.debug("prefill queue depth unavailable: %r", e)

    async def _watch_config(self) -> None:
        await watch_key(self.bus, config_bucket(), DISAGG_KEY, self.apply_config)

    def apply_config(self, raw: bytes) -> None:
        try:
            cfg = json.loads(raw)
            if "min_tokens" in cfg:
                self.settings.min_tokens = int(cfg["min_tokens"])
            if "max_queue" in cfg:
                self.settings.max_queue = int(cfg["max_queue"])
            if "enabled" in cfg:
                self.settings.enabled = bool(cfg["enabled"])
            log.info("disaggregation limits now: min_tokens=%d max_queue=%d enabled=%s", self.settings.min_tokens,
                     self.settings.max_queue, self.settings.enabled)
        except (ValueError, TypeError) as e:
            log.warning("ignoring bad %s/%s value %r: %s", subjects.CONFIG_BUCKET, DISAGG_KEY, raw[:100], e)

    def decide(self, token_ids: list[int]) -> str:
        """'remote' or why not."""
        s = self.settings
        if not s.enabled or not self.engine.supports_remote_prefill:
            return "local_disabled"
        if len(token_ids) < s.min_tokens:  # short whatever is cached: no need to hash the prompt
            return "local_short"
        uncached = len(token_ids) - self.engine.cached_prefix_tokens(token_ids)
        if uncached < s.min_tokens:
            return "local_short"
        if not self.view.workers("prefill", None):
            return "local_no_prefill_worker"
        if self._queue_depth >= s.max_queue:
            return "local_queue_full"
        return "remote"

    async def prefill(self, request_id: str, token_ids: list[int], sampling: SamplingParams,
                      parent: object = None) -> int | None:
        """Have a prefill worker compute the prompt into reserved blocks; the first token, or None
        to prefill locally (the reservation is then already released)."""
        try:
            block_ids, _cached_blocks = self.engine.reserve_remote_prefill(request_id, token_ids)
        except RuntimeError as e:
            count_decision("local_no_blocks")
            log.debug("no room to reserve for %s: %s", request_id, e)
            return None
        t0 = time.monotonic()
        span = tracing.start("remote_prefill", tracing.SpanKind.PRODUCER, parent, **{
            "baton.request_id": request_id, "baton.blocks": len(block_ids)})
        inbox = self.bus.inbox.open(f"prefill-{request_id}")
        committed = False
        try:
            # The token travels only in the job: the prefill worker presents it with the bytes.
            token = self.transport.expect(request_id, self.engine.kv_views(block_ids)).token if block_ids else b""
            job = PrefillJob(
                request_id=request_id, token_ids=token_ids, sampling=sampling, decode_worker_id=self.worker_id,
                kv_endpoint=self.transport.endpoint if block_ids else "", kv_layout=self.engine.kv_layout(),
                block_ids=block_ids, kv_token=token, notify_subject=inbox.subject,
                deadline=time.time() + self.settings.prefill_timeout,
            )
            await publish_prefill_job(self.bus, encode(job), headers=tracing.headers_for(span))
            reply = prefill_reply_decoder.decode((await inbox.next(self.settings.prefill_timeout)).data)
            if not isinstance(reply, PrefillDone) or reply.first_token < 0:
                raise TransferError(f"prefill failed: {getattr(reply, 'reason', reply)}")
            if block_ids:
                await self.transport.wait(request_id, timeout=5)
            committed = True
            count_decision("remote")
            REMOTE_SECONDS.set(time.monotonic() - t0)
            tracing.end(span, **{"baton.prefill_worker_id": reply.prefill_worker_id})
            return reply.first_token
        except Exception as e:  # any failure of the remote path: prefill here instead
            count_decision("fallback_local")
            log.warning("remote prefill of %s failed (%r); prefilling locally", request_id, e)
            tracing.end(span, error=repr(e))
            return None
        finally:
            self.bus.inbox.close(f"prefill-{request_id}")
            if not committed:
                self.transport.forget(request_id)
                self.engine.release_remote_prefill(request_id)
