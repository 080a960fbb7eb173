"""The frontend's side of the route hop: route requests gathered per event-loop turn, one message.

Under load many requests reach their route call in the same loop turn (a step's replies finish a
batch of requests, and their clients send the next ones together). The first caller of a turn
waits one turn for the others, sends them all as one :class:`RouteBatch` and hands each caller
its answer from the one :class:`RouteBatchReply`: one message each way, one wake-up of the router
and of this process, instead of one per request. A caller alone in its turn (low load) sends a
plain :class:`RouteRequest`, as before, so what it costs at concurrency 1 does not change.

A request with a trace context (tracing on) goes alone, with its headers. A router that does not
know batches (an older one, mid-upgrade) answers a batch with a 400: the batch is then asked one
request at a time and batching stays off in this process.
"""

from __future__ import annotations

import asyncio
import logging

from shared.bus import Bus, BusError
from shared.messages import (
    RouteBatch,
    RouteBatchReply,
    RouteDecision,
    RouteError,
    RouteRequest,
    route_batch_reply_decoder,
)
from shared.subjects import ROUTE

log = logging.getLogger("baton.frontend")

RouteReply = RouteDecision | RouteError


class _LeaderLeft(Exception):
    """The caller that was sending a batch was cancelled: the others in it ask again."""


class RouteClient:
    def __init__(self, bus: Bus, subject: str = ROUTE, batching: bool = True) -> None:
        self.bus = bus
        self.subject = subject
        self.batching = batching
        self._gathering: list[tuple[RouteRequest, asyncio.Future[RouteReply]]] | None = None
        self.batches = 0  # batches of more than one request sent (tests, debugging)

    async def route(self, req: RouteRequest, timeout: float, headers: dict[str, str] | None = None) -> RouteReply:
        """The router's answer to ``req``. Raises what :meth:`Bus.ask` raises (for the whole batch)."""
        if headers or not self.batching:
            return await self._one(req, timeout, headers)
        if self._gathering is not None:  # another caller leads this turn's batch: join it
            fut: asyncio.Future[RouteReply] = asyncio.get_running_loop().create_future()
            self._gathering.append((req, fut))
            try:
                return await fut
            except _LeaderLeft:  # its caller went away before the answer came: ask anew
                return await self.route(req, timeout)
        self._gathering = batch = []
        try:
            try:
                await asyncio.sleep(0)  # one loop turn: the requests handled in it join
            finally:
                self._gathering = None
            if not batch:
                return await self._one(req, timeout, None)
            replies = await self._batch([req, *(r for r, _ in batch)], timeout)
        except BaseException as e:  # the followers share the fate of the batch, but not our cancellation
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(e if isinstance(e, Exception) else _LeaderLeft())
            raise
        for (_, fut), reply in zip(batch, replies[1:], strict=True):
            if not fut.done():
                fut.set_result(reply)
        return replies[0]

    async def _one(self, req: RouteRequest, timeout: float, headers: dict[str, str] | None) -> RouteReply:
        msg = await self.bus.ask(self.subject, req, timeout, headers=headers)
        reply = route_batch_reply_decoder.decode(msg.data)
        if isinstance(reply, RouteBatchReply):
            raise BusError("the router answered a single route request with a batch")
        return reply

    async def _batch(self, reqs: list[RouteRequest], timeout: float) -> list[RouteReply]:
        msg = await self.bus.ask(self.subject, RouteBatch(requests=reqs), timeout)
        reply = route_batch_reply_decoder.decode(msg.data)
        if isinstance(reply, RouteBatchReply):
            if len(reply.replies) != len(reqs):
                raise BusError(f"the router answered {len(reply.replies)} of {len(reqs)} batched route requests")
            self.batches += 1
            return reply.replies
        if not isinstance(reply, RouteError):
            raise BusError("the router answered a batch of route requests with a single decision")
        if reply.code == 400:  # a router that knows no batches
            log.warning("the router does not take batched route requests (%s); asking one at a time", reply.message)
            self.batching = False
            return [await self._one(r, timeout, None) for r in reqs]
        return [reply] * len(reqs)  # an error for the whole batch
