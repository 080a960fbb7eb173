"""The router service: answers "which decode worker?" on ``baton.v1.route`` (a queue group).

The decision and what keeps it current (KV events, LoadReports, discovery) are
:class:`shared.routing.core.RouterCore`; this service puts it on the bus, so frontends and routers
scale apart. A frontend may instead run the same core in process (``--router embedded``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import anyio
from nats.aio.msg import Msg
from prometheus_client import Histogram

from shared import tracing
from shared.bus import Bus
from shared.cli_options import DEFAULT_NATS_URL
from shared.discovery import WorkerView
from shared.messages import (
    RouteBatchReply,
    RouteDecision,
    RouteError,
    RouteLeaseRequest,
    RouteRequest,
    route_message_decoder,
)
from shared.routing.core import ERRORS, RouterCore, RoutingSettings
from shared.routing.kv_feed import KvEventFeed
from shared.routing.policy import RoutingPolicy, make_policy
from shared.subjects import ROUTE, ROUTER_QUEUE
from shared.telemetry import serve_metrics

log = logging.getLogger("baton.router")

BATCH_REQUESTS = Histogram("baton_router_route_batch_requests",
                           "Route requests per message taken (a frontend's RouteBatch of one loop turn, or 1)",
                           buckets=(1, 2, 4, 8, 16, 32, 64, 128))


@dataclass
class RouterSettings(RoutingSettings):
    nats_url: str = DEFAULT_NATS_URL
    metrics_port: int = 0


class Router:
    def __init__(self, settings: RouterSettings, policy: RoutingPolicy | None = None) -> None:
        self.settings = settings
        self.policy = policy or make_policy(settings.mode, settings.seed, settings.kv_config())
        self.bus: Bus | None = None
        self.core: RouterCore | None = None
        self.ready = False
        self.started = anyio.Event()  # set once the router answers route requests
        self._stop = anyio.Event()

    async def run(self) -> None:
        self.bus = await Bus.connect(self.settings.nats_url, "baton-router")
        try:
            view = WorkerView(self.bus, self.settings.discovery_ttl)
            self.core = RouterCore(self.settings, self.bus, view, self.policy)
            async with anyio.create_task_group() as tg:
                tg.start_soon(view.run)
                if self.settings.metrics_port:
                    tg.start_soon(serve_metrics, self.settings.metrics_port,
                                  lambda: self.ready and self.bus is not None and self.bus.connected)
                tg.start_soon(self.core.run)
                await self.core.started.wait()
                sub = await self.bus.subscribe(ROUTE, self._on_route, queue=ROUTER_QUEUE)
                self.ready = True
                self.started.set()
                log.info("router up, policy %s", self.policy.name)
                await self._stop.wait()
                self.ready = False
                await sub.unsubscribe()
                await self.core.close()
                tg.cancel_scope.cancel()
        finally:
            await self.bus.close()

    @property
    def feed(self) -> KvEventFeed | None:
        return self.core.feed if self.core is not None else None

    async def drain(self) -> None:
        self._stop.set()
        await anyio.sleep_forever()

    async def _on_route(self, msg: Msg) -> None:
        """One RouteRequest, a frontend's RouteBatch (answered with one RouteBatchReply), or a
        RouteLeaseRequest (decisions ahead: shared/routing/lease.py)."""
        assert self.bus is not None and self.core is not None
        try:
            req = route_message_decoder.decode(msg.data)
        except Exception as e:
            ERRORS.labels("bad_request").inc()
            await self.bus.respond(msg, RouteError(code=400, message=f"undecodable route request: {e}"))
            return
        parent = tracing.context_from(msg.headers)
        if isinstance(req, RouteRequest):
            BATCH_REQUESTS.observe(1)
            reply, placement = self.core.decide(req, parent)
            # Answer, then book-keep: the frontend need not wait for the bookkeeping. A subscription's
            # callbacks run one at a time, so the next decision still sees this one recorded.
            await self.bus.respond(msg, reply)
            if placement is not None:
                self.core.record(placement)
            return
        if isinstance(req, RouteLeaseRequest):
            await self.bus.respond(msg, self.core.lease(req))
            return
        # A batch: each decision must see the ones before it recorded (predicted load, KV blocks).
        BATCH_REQUESTS.observe(len(req.requests))
        replies: list[RouteDecision | RouteError] = []
        for one in req.requests:
            reply, placement = self.core.decide(one, parent)
            replies.append(reply)
            if placement is not None:
                self.core.record(placement)
        await self.bus.respond(msg, RouteBatchReply(replies=replies))
