"""The router actor: answers "which decode worker?" on ``baton.v1.route`` (a queue group)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import anyio
from nats.aio.msg import Msg
from prometheus_client import Counter, Histogram

from services.router.policy import RoutingPolicy, make_policy
from shared.bus import Bus
from shared.config import DEFAULT_NATS_URL
from shared.discovery import DEFAULT_TTL, WorkerView
from shared.messages import RouteDecision, RouteError, route_request_decoder
from shared.subjects import ROUTE, ROUTER_QUEUE
from shared.telemetry import serve_metrics

log = logging.getLogger("baton.router")

DECISIONS = Counter("baton_router_decisions_total", "Routing decisions by worker", ["worker_id", "policy"])
DECISION_SECONDS = Histogram(
    "baton_router_decision_seconds", "Time to choose a worker",
    buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 0.01),
)
ERRORS = Counter("baton_router_errors_total", "Requests the router could not place", ["reason"])


@dataclass
class RouterSettings:
    nats_url: str = DEFAULT_NATS_URL
    mode: str = "round-robin"
    discovery_ttl: float = DEFAULT_TTL
    metrics_port: int = 0
    seed: int | None = None


class Router:
    def __init__(self, settings: RouterSettings, policy: RoutingPolicy | None = None) -> None:
        self.settings = settings
        self.policy = policy or make_policy(settings.mode, settings.seed)
        self.bus: Bus | None = None
        self.view: WorkerView | None = None
        self._stop = anyio.Event()

    async def run(self) -> None:
        self.bus = await Bus.connect(self.settings.nats_url, "baton-router")
        try:
            self.view = WorkerView(self.bus, self.settings.discovery_ttl)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.view.run)
                if self.settings.metrics_port:
                    tg.start_soon(serve_metrics, self.settings.metrics_port, lambda: self.bus is not None and self.bus.connected)
                sub = await self.bus.subscribe(ROUTE, self._on_route, queue=ROUTER_QUEUE)
                log.info("router up, policy %s", self.policy.name)
                await self._stop.wait()
                await sub.unsubscribe()
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
        worker, overlap = self.policy.choose_worker(req, workers)
        DECISION_SECONDS.observe(time.perf_counter() - t0)
        DECISIONS.labels(worker.worker_id, self.policy.name).inc()
        await self.bus.respond(msg, RouteDecision(
            worker_id=worker.worker_id, subject=worker.generate_subject, cancel_subject=worker.cancel_subject,
            overlap_blocks=overlap, policy=self.policy.name,
        ))
