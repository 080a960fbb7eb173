"""The routing decision and everything that keeps it current, wherever it runs.

:class:`RouterCore` answers "which decode worker?" for a :class:`RouteRequest`. With a KV-aware
policy it also keeps the KV index current (:class:`KvEventFeed`: the KV events stream, replayed
from a snapshot at start), follows the workers' LoadReports, and once a second drops workers whose
discovery key is gone; and counts the traffic it places for the planner (:mod:`shared.routing.traffic`).
The router service (``services/router``) serves it on ``baton.v1.route``;
a frontend started with ``--router embedded`` calls it in process, so a request skips the route
hop. Either way it is the same code fed by the same events.
"""

from __future__ import annotations

import collections
import logging
import random
import time
import weakref
from dataclasses import dataclass

import anyio
from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge, Histogram

from shared import tracing
from shared.bus import Bus
from shared.discovery import DEFAULT_TTL, WorkerView
from shared.messages import (
    RouteDecision,
    RouteError,
    RouteLease,
    RouteLeaseRequest,
    RouteRequest,
    WorkerInfo,
    load_report_decoder,
)
from shared.routing.affinity import SessionAffinity
from shared.routing.kv_feed import KvEventFeed
from shared.routing.kv_policy import KvRouter, KvRouterConfig
from shared.routing.policy import RandomChoice, RoundRobin, RoutingPolicy, make_policy
from shared.routing.traffic import TrafficCounter
from shared.subjects import LOAD_ALL

log = logging.getLogger("baton.router")

DECISIONS = Counter("baton_router_decisions_total", "Routing decisions by worker", ["worker_id", "policy"])
DECISION_SECONDS = Histogram(
    "baton_router_decision_seconds", "Time to choose a worker",
    buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 0.01),
)
ERRORS = Counter("baton_router_errors_total", "Requests the router could not place", ["reason"])
LEASED = Counter("baton_router_leased_decisions_total",
                 "Decisions granted ahead to frontends (round-robin, random), by worker; counted when granted",
                 ["worker_id", "policy"])
MAX_LEASE = 1024  # decisions one lease request may take
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
PENDING_REQUESTS = Gauge("baton_router_pending_requests",
                         "Requests sent to workers that no load report shows yet (counted as pending work)")
_CORES: weakref.WeakSet[RouterCore] = weakref.WeakSet()
PENDING_REQUESTS.set_function(lambda: sum(c.pending_requests() for c in list(_CORES)))  # read at scrape time

PRUNE_GRACE_S = 2.0  # a worker missing from discovery this long is dropped from the index
MAINTAIN_INTERVAL_S = 1.0
UNSUBSCRIBE_TIMEOUT_S = 5.0


@dataclass
class RoutingSettings:
    mode: str = "round-robin"
    discovery_ttl: float = DEFAULT_TTL
    seed: int | None = None
    overlap_weight: float = 1.0
    lower_tier_weight: float = 0.25
    lora_load_weight: float = 32.0
    temperature: float = 0.0
    prediction_ttl: float = 0.0  # 0: the policy's default (10 s with events, 120 s without)
    snapshot_interval: float = 30.0  # 0: never write index snapshots
    catchup_timeout: float = 20.0
    session_ttl: float = 600.0  # seconds a session (x-session-id) stays on its worker unused; 0: no affinity
    lease_ttl: float = 1.0  # seconds a frontend may use decisions granted ahead (shared/routing/lease.py)

    def kv_config(self) -> KvRouterConfig:
        return KvRouterConfig(overlap_weight=self.overlap_weight, lower_tier_weight=self.lower_tier_weight,
                              lora_load_weight=self.lora_load_weight,
                              temperature=self.temperature,
                              prediction_ttl=self.prediction_ttl, seed=self.seed)


@dataclass(slots=True)
class Placement:
    """A decision still to be recorded in the KV policy's predictions (see :meth:`RouterCore.record`)."""

    worker: WorkerInfo
    hashes: list[int]
    overlap: int
    num_tokens: int
    now: float
    lora: str = ""


class RouterCore:
    def __init__(self, settings: RoutingSettings, bus: Bus, view: WorkerView,
                 policy: RoutingPolicy | None = None) -> None:
        self.settings = settings
        self.policy = policy or make_policy(settings.mode, settings.seed, settings.kv_config())
        self.kv = self.policy if isinstance(self.policy, KvRouter) else None
        self.bus = bus
        self.view = view
        self.feed: KvEventFeed | None = None
        self.started = anyio.Event()  # set once decisions use the caught-up index
        self.affinity = SessionAffinity(settings.session_ttl) if settings.session_ttl > 0 else None
        self._missing_since: dict[str, float] = {}
        self.traffic = TrafficCounter()  # what this router placed, reported to the planner
        self._decisions: dict[str, Counter] = {}  # worker id -> its DECISIONS child
        self._sessions_seen = anyio.Event()  # set by the first request with a session id
        _CORES.add(self)

    def pending_requests(self) -> int:
        """Requests this router sent that the workers' load reports do not show yet."""
        return sum(ld.pending_requests for ld in self.kv.loads.values()) if self.kv is not None else 0

    async def run(self) -> None:
        """Keep the policy current until cancelled (the view runs elsewhere: its owner shares it)."""
        subs = []
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.traffic.run, self.bus)
                if self.kv is not None:
                    with anyio.move_on_after(5):
                        await self.view.synced.wait()
                    if self.kv.config.use_kv_events:
                        self.feed = KvEventFeed(self.bus, self.kv, self.settings.snapshot_interval,
                                                self.settings.catchup_timeout)
                        await self.feed.start()
                        tg.start_soon(self.feed.run)  # follows the stream across failovers; snapshots
                    self._maintain_kv()
                    tg.start_soon(self._maintain_loop)
                if self.kv is not None:
                    subs.append(await self.bus.subscribe(LOAD_ALL, self._on_load))
                self.started.set()
                log.info("routing up, policy %s", self.policy.name)
                if self.kv is None and self.affinity is not None:
                    # Only session affinity reads load reports here (is the session's worker full?):
                    # follow them from the first request with a session id, not for every router
                    # that never sees one (a busy worker sends up to 20 reports a second).
                    await self._sessions_seen.wait()
                    subs.append(await self.bus.subscribe(LOAD_ALL, self._on_load))
                await anyio.sleep_forever()
        finally:
            with anyio.move_on_after(UNSUBSCRIBE_TIMEOUT_S, shield=True):
                for sub in subs:
                    try:
                        await sub.unsubscribe()
                    except Exception as e:  # the connection may already be gone
                        log.debug("unsubscribe failed: %r", e)

    async def close(self) -> None:
        """Write a last snapshot (the next router starts from here) and stop the KV feed."""
        if self.feed is None:
            return
        with anyio.move_on_after(5, shield=True):
            try:
                await self.feed.save_snapshot()
            except Exception as e:
                log.debug("final snapshot failed: %r", e)
            await self.feed.stop()

    def decide(self, req: RouteRequest, trace_parent: tracing.Parent = None) -> tuple[RouteDecision | RouteError,
                                                                               Placement | None]:
        """Choose a worker for ``req``. Any :class:`Placement` returned must go to :meth:`record` next,
        before the next decision: the caller answers first, so it need not wait for the bookkeeping."""
        t0 = time.perf_counter()
        model_workers = workers = self.view.workers("decode", req.model)  # only this model's: see KvRouter.decide
        if req.lora:  # only workers that have the adapter loaded (resident or not) can serve it
            workers = [w for w in workers if any(a.name == req.lora for a in w.loras)]
            if not workers:
                ERRORS.labels("no_lora").inc()
                return RouteError(code=404, message=f"no decode worker of {req.model!r} has the LoRA adapter "
                                                    f"{req.lora!r} loaded"), None
        if req.exclude:
            workers = [w for w in workers if w.worker_id not in req.exclude] or workers
        if not workers:
            ERRORS.labels("no_worker").inc()
            return RouteError(code=503, message=f"no decode worker serves {req.model!r}"), None
        hashes: list[int] | None = None
        now = time.monotonic()
        if req.session_id and self.affinity is not None:
            if not self._sessions_seen.is_set():
                self._sessions_seen.set()
            pinned = self.affinity.pinned(req.session_id, workers, now)
            if pinned is not None:
                workers = [pinned]  # the policy still scores it: overlap, predictions, load
        try:
            if self.kv is not None:
                worker, overlap, hashes = self.kv.decide(req, workers, now, model_workers)
            else:
                worker, overlap = self.policy.choose_worker(req, workers)
        except Exception:  # a policy bug must not cost the request: place it anyway
            ERRORS.labels("policy").inc()
            log.exception("policy %s failed; routing %s at random", self.policy.name, req.request_id)
            worker, overlap, hashes = random.choice(workers), 0, None
        if req.session_id and self.affinity is not None:
            self.affinity.remember(req.session_id, worker.worker_id, now)
        if not req.exclude:  # a new request, not a re-route after a failure
            self.traffic.count(req)
        DECISION_SECONDS.observe(time.perf_counter() - t0)
        if tracing.ENABLED:
            span = tracing.start("route_decision", tracing.SpanKind.SERVER, trace_parent, **{
                "baton.request_id": req.request_id, "baton.policy": self.policy.name,
                "baton.worker_id": worker.worker_id, "baton.overlap_blocks": overlap,
                "baton.candidates": len(workers)})
            tracing.end(span)
        hint = self.kv.last_hint if self.kv is not None and hashes is not None else None
        counter = self._decisions.get(worker.worker_id)
        if counter is None:  # labels() costs a lock and a tuple lookup per call: once per worker instead
            counter = self._decisions[worker.worker_id] = DECISIONS.labels(worker.worker_id, self.policy.name)
        counter.inc()
        decision = RouteDecision(
            worker_id=worker.worker_id, subject=worker.generate_subject, cancel_subject=worker.cancel_subject,
            overlap_blocks=overlap, policy=self.policy.name,
            kv_source=hint[0] if hint else "", kv_source_blocks=hint[1] if hint else 0,
        )
        if self.kv is None or hashes is None:
            return decision, None
        return decision, Placement(worker, hashes, overlap, len(req.token_ids), now, req.lora)

    def lease(self, req: RouteLeaseRequest) -> RouteLease | RouteError:
        """``req.count`` decisions ahead, for requests without a session, adapter or workers to avoid.
        Only a policy that does not read the request can decide before it exists; a KV-aware one
        answers 409 and the frontend asks per request. Traffic is counted by the frontend that uses
        the decisions (an unused one expires uncounted)."""
        if self.kv is not None:
            return RouteError(code=409, message=f"the {self.policy.name} policy decides per request")
        if self.settings.lease_ttl <= 0:
            return RouteError(code=409, message="route leases are off on this router (--lease-ttl 0)")
        workers = self.view.workers("decode", req.model)
        if not workers:
            ERRORS.labels("no_worker").inc()
            return RouteError(code=503, message=f"no decode worker serves {req.model!r}")
        if req.count < 1:
            return RouteError(code=400, message="a lease needs a count of at least 1")
        if not isinstance(self.policy, RoundRobin | RandomChoice):
            return RouteError(code=409, message=f"the {self.policy.name} policy does not decide ahead")
        index: dict[str, int] = {}
        granted: list[RouteDecision] = []
        order: list[int] = []
        for worker in self.policy.choose_many(workers, min(req.count, MAX_LEASE)):
            i = index.get(worker.worker_id)
            if i is None:
                i = index[worker.worker_id] = len(granted)
                granted.append(RouteDecision(worker_id=worker.worker_id, subject=worker.generate_subject,
                                             cancel_subject=worker.cancel_subject, policy=self.policy.name))
            order.append(i)
        for i, n in collections.Counter(order).items():
            LEASED.labels(granted[i].worker_id, self.policy.name).inc(n)
        return RouteLease(workers=granted, order=order, ttl=self.settings.lease_ttl)

    def record(self, placement: Placement) -> None:
        assert self.kv is not None
        try:
            self.kv.record(placement.worker, placement.hashes, placement.overlap, placement.num_tokens, placement.now,
                           placement.lora)
        except Exception:
            ERRORS.labels("policy").inc()
            log.exception("recording a decision for worker %s failed", placement.worker.worker_id)
        OVERLAP_BLOCKS.observe(placement.overlap)
        blocks = placement.num_tokens // placement.worker.block_size
        OVERLAP_RATIO.observe(placement.overlap / blocks if blocks else 0.0)

    async def route(self, req: RouteRequest, timeout: float) -> RouteDecision | RouteError:
        """In process: wait (up to ``timeout``) for the index to catch up, decide and record."""
        if not self.started.is_set():
            with anyio.move_on_after(timeout):
                await self.started.wait()
            if not self.started.is_set():
                return RouteError(code=503, message="the embedded router is still catching up with KV events")
        reply, placement = self.decide(req)
        if placement is not None:
            self.record(placement)
        return reply

    async def _on_load(self, msg: Msg) -> None:
        try:
            report = load_report_decoder.decode(msg.data)
        except Exception:
            return
        if report.role == "decode":
            if self.kv is not None:
                self.kv.on_load(report)
            if self.affinity is not None:
                self.affinity.on_load(report)

    async def _maintain_loop(self) -> None:
        while True:
            await anyio.sleep(MAINTAIN_INTERVAL_S)
            live = self._maintain_kv()
            if self.feed is not None:
                await self.feed.request_resyncs(live)

    def _maintain_kv(self) -> set[str]:
        """Drop workers gone from discovery, free their slots, refresh the index gauges."""
        assert self.kv is not None
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
