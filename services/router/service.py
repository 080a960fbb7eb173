"""The router actor: answers "which decode worker?" on ``baton.v1.route`` (a queue group).

With a KV-aware policy it also keeps the KV index current (:class:`KvEventFeed`: the KV events
stream, replayed from a snapshot at start), follows the workers' LoadReports, and once a second
drops workers whose discovery key is gone.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import anyio
from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge, Histogram

from services.router.kv_feed import KvEventFeed
from services.router.kv_policy import KvRouter, KvRouterConfig
from services.router.policy import RoutingPolicy, make_policy
from shared import tracing
from shared.bus import Bus
from shared.config import DEFAULT_NATS_URL
from shared.discovery import DEFAULT_TTL, WorkerView
from shared.messages import RouteDecision, RouteError, load_report_decoder, route_request_decoder
from shared.subjects import LOAD_ALL, ROUTE, ROUTER_QUEUE
from shared.telemetry import serve_metrics

log = logging.getLogger("baton.router")

DECISIONS = Counter("baton_router_decisions_total", "Routing decisions by worker", ["worker_id", "policy"])
DECISION_SECONDS = Histogram(
    "baton_router_decision_seconds", "Time to choose a worker",
    buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 0.01),
)
ERRORS = Counter("baton_router_errors_total", "Requests the router could not place", ["reason"])
OVERLAP_BLOCKS = Histogram(
    "baton_router_predicted_overlap_blocks", "Cached prefix blocks predicted on the chosen worker",
    buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
)
OVERLAP_RATIO = Histogram(
    "baton_router_predicted_overlap_ratio", "Predicted cached share of the prompt on the chosen worker",
    buckets=(0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0),
)
INDEX_BLOCKS = Gauge("baton_router_index_blocks", "Distinct KV block hashes indexed")
INDEX_ENTRIES = Gauge("baton_router_index_entries", "Indexed (worker, block) pairs")
INDEX_BYTES = Gauge("baton_router_index_bytes", "Estimated memory of the KV index")
INDEX_WORKERS = Gauge("baton_router_index_workers", "Workers with blocks in the KV index")
PREDICTED_BLOCKS = Gauge("baton_router_predicted_blocks", "Blocks predicted cached from recent decisions")

PRUNE_GRACE_S = 2.0  # a worker missing from discovery this long is dropped from the index
MAINTAIN_INTERVAL_S = 1.0


@dataclass
class RouterSettings:
    nats_url: str = DEFAULT_NATS_URL
    mode: str = "round-robin"
    discovery_ttl: float = DEFAULT_TTL
    metrics_port: int = 0
    seed: int | None = None
    overlap_weight: float = 1.0
    lower_tier_weight: float = 0.25
    temperature: float = 0.0
    prediction_ttl: float = 0.0  # 0: the policy's default (10 s with events, 120 s without)
    snapshot_interval: float = 30.0  # 0: never write index snapshots
    catchup_timeout: float = 20.0

    def kv_config(self) -> KvRouterConfig:
        return KvRouterConfig(overlap_weight=self.overlap_weight, lower_tier_weight=self.lower_tier_weight,
                              temperature=self.temperature,
                              prediction_ttl=self.prediction_ttl, seed=self.seed)


class Router:
    def __init__(self, settings: RouterSettings, policy: RoutingPolicy | None = None) -> None:
        self.settings = settings
        self.policy = policy or make_policy(settings.mode, settings.seed, settings.kv_config())
        self.kv = self.policy if isinstance(self.policy, KvRouter) else None
        self.bus: Bus | None = None
        self.view: WorkerView | None = None
        self.feed: KvEventFeed | None = None
        self.ready = False
        self.started = anyio.Event()  # set once the router answers route requests
        self._stop = anyio.Event()
        self._missing_since: dict[str, float] = {}

    async def run(self) -> None:
        self.bus = await Bus.connect(self.settings.nats_url, "baton-router")
        try:
            self.view = WorkerView(self.bus, self.settings.discovery_ttl)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.view.run)
                if self.settings.metrics_port:
                    tg.start_soon(serve_metrics, self.settings.metrics_port,
                                  lambda: self.ready and self.bus is not None and self.bus.connected)
                subs = []
                if self.kv is not None:
                    with anyio.move_on_after(5):
                        await self.view.synced.wait()
                    if self.kv.config.use_kv_events:
                        self.feed = KvEventFeed(self.bus, self.kv, self.settings.snapshot_interval,
                                                self.settings.catchup_timeout)
                        await self.feed.start()
                        tg.start_soon(self.feed.run)  # follows the stream across failovers; snapshots
                    subs.append(await self.bus.subscribe(LOAD_ALL, self._on_load))
                    self._maintain_kv()
                    tg.start_soon(self._maintain_loop)
                subs.append(await self.bus.subscribe(ROUTE, self._on_route, queue=ROUTER_QUEUE))
                self.ready = True
                self.started.set()
                log.info("router up, policy %s", self.policy.name)
                await self._stop.wait()
                self.ready = False
                for sub in subs:
                    await sub.unsubscribe()
                if self.feed is not None:
                    with anyio.move_on_after(5, shield=True):
                        try:
                            await self.feed.save_snapshot()  # the next router starts from here
                        except Exception as e:
                            log.debug("final snapshot failed: %r", e)
                        await self.feed.stop()
                tg.cancel_scope.cancel()
        finally:
            await self.bus.close()

    async def drain(self) -> None:
        self._stop.set()
        await anyio.sleep_forever()

    async def _on_route(self, msg: Msg) -> None:
        assert self.bus is not None and self.view is not None
        t0 = time.perf_counter()
        try:
            req = route_request_decoder.decode(msg.data)
        except Exception as e:
            ERRORS.labels("bad_request").inc()
            await self.bus.respond(msg, RouteError(code=400, message=f"undecodable route request: {e}"))
            return
        workers = self.view.workers("decode", req.model)
        if req.exclude:
            workers = [w for w in workers if w.worker_id not in req.exclude] or workers
        if not workers:
            ERRORS.labels("no_worker").inc()
            await self.bus.respond(msg, RouteError(code=503, message=f"no decode worker serves {req.model!r}"))
            return
        hashes: list[int] | None = None
        now = time.monotonic()
        try:
            if self.kv is not None:
                # Decide, answer, then book-keep: the frontend need not wait for the bookkeeping.
                worker, overlap, hashes = self.kv.decide(req, workers, now)
            else:
                worker, overlap = self.policy.choose_worker(req, workers)
        except Exception:  # a policy bug must not cost the request: place it anyway
            ERRORS.labels("policy").inc()
            log.exception("policy %s failed; routing %s at random", self.policy.name, req.request_id)
            worker, overlap, hashes = random.choice(workers), 0, None
        DECISION_SECONDS.observe(time.perf_counter() - t0)
        if tracing.ENABLED:
            span = tracing.start("route_decision", tracing.SpanKind.SERVER, tracing.context_from(msg.headers), **{
                "baton.request_id": req.request_id, "baton.policy": self.policy.name,
                "baton.worker_id": worker.worker_id, "baton.overlap_blocks": overlap,
                "baton.candidates": len(workers)})
            tracing.end(span)
        hint = self.kv.last_hint if self.kv is not None and hashes is not None else None
        await self.bus.respond(msg, RouteDecision(
            worker_id=worker.worker_id, subject=worker.generate_subject, cancel_subject=worker.cancel_subject,
            overlap_blocks=overlap, policy=self.policy.name,
            kv_source=hint[0] if hint else "", kv_source_blocks=hint[1] if hint else 0,
        ))
        DECISIONS.labels(worker.worker_id, self.policy.name).inc()
        if self.kv is not None and hashes is not None:
            # After the reply, yet before the next decision: a subscription's callbacks run one at
            # a time, so the next route request waits until this one is recorded.
            try:
                self.kv.record(worker, hashes, overlap, len(req.token_ids), now)
            except Exception:
                ERRORS.labels("policy").inc()
                log.exception("recording the decision for %s failed", req.request_id)
            OVERLAP_BLOCKS.observe(overlap)
            blocks = len(req.token_ids) // worker.block_size
            OVERLAP_RATIO.observe(overlap / blocks if blocks else 0.0)

    async def _on_load(self, msg: Msg) -> None:
        assert self.kv is not None
        try:
            report = load_report_decoder.decode(msg.data)
        except Exception:
            return
        if report.role == "decode":
            self.kv.on_load(report)

    async def _maintain_loop(self) -> None:
        while True:
            await anyio.sleep(MAINTAIN_INTERVAL_S)
            live = self._maintain_kv()
            if self.feed is not None:
                await self.feed.request_resyncs(live)

    def _maintain_kv(self) -> set[str]:
        """Drop workers gone from discovery, free their slots, refresh the index gauges."""
        assert self.kv is not None and self.view is not None
        now = time.monotonic()
        live = {w.worker_id for w in self.view.workers()}
        known = set(self.kv.index.worker_ids) | set(self.kv.loads)
        for worker_id in known - live:
            since = self._missing_since.setdefault(worker_id, now)
            # A grace period: a new worker's first events can beat its discovery entry here.
            if now - since >= PRUNE_GRACE_S:
                log.info("worker %s left discovery: dropping its %d indexed blocks", worker_id,
                         self.kv.index.block_count(worker_id))
                self.kv.forget_worker(worker_id, now)
                del self._missing_since[worker_id]
        for worker_id in list(self._missing_since):
            if worker_id in live or worker_id not in known:
                del self._missing_since[worker_id]
        self.kv.maintain(now)
        stats = self.kv.index.stats()
        INDEX_BLOCKS.set(stats.blocks)
        INDEX_ENTRIES.set(stats.entries)
        INDEX_BYTES.set(stats.approx_bytes)
        INDEX_WORKERS.set(stats.workers)
        PREDICTED_BLOCKS.set(len(self.kv.predicted))
        return live
