"""Route leases: a frontend holds routing decisions ahead, so most requests skip the route hop.

Round-robin and random decide without reading the request, so the router service can make a
frontend's next decisions before its requests exist. The frontend asks for a lease of N decisions
for a model (one small message each way), uses them in order, and asks for the next lease in the
background when half is used, so under steady load no request waits for the router. The router
stays the one that decides: a lease is a slice of its own rotation, so the workers stay evenly
loaded across frontends.

What still asks the router per request:
- requests with a session id (affinity is the router's state), with an adapter, or with workers to
  avoid (a re-route after a failure);
- every request under a KV-aware policy, which reads the prompt: such a router refuses leases
  (409) and this frontend stops asking for :data:`RETRY_OFF_S`; so does a router started with
  ``--lease-ttl 0``, or one too old to know leases (400).

Staleness is bounded: a lease is used for at most ``ttl`` seconds (the router's ``--lease-ttl``,
1 s by default), so a new worker gets traffic within about a second. A decision naming a worker
that has gone fails as any routing decision can (no responders, busy); the request is re-routed
through the router, and :meth:`RouteLeases.forget` drops that worker from what is held.

The requests placed from a lease are counted here and reported to the planner, as a router counts
the ones it places (shared/routing/traffic.py): each request is still counted exactly once.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque

import anyio
import msgspec

from shared.bus import Bus, BusError
from shared.messages import RouteDecision, RouteError, RouteLeaseRequest, route_lease_reply_decoder
from shared.routing.traffic import TrafficCounter
from shared.subjects import ROUTE

log = logging.getLogger("baton.frontend")

MIN_LEASE = 4  # and the least demand worth a lease: this many requests expected in half its life
MAX_LEASE = 512
FIRST_LEASE = 16  # a lease is at most twice the last one, starting from this
DEMAND_WINDOW_S = 0.5  # the request rate is measured over windows this long
RETRY_OFF_S = 30.0  # after a router refused leases: ask per request this long, then try again
RETRY_FAILED_S = 0.5  # after a lease request failed (no router, timeout, no worker)


class _Held:
    """One model's decisions in hand, and its recent request rate."""

    __slots__ = ("decisions", "expires", "last_rate", "retry_at", "size", "ttl", "window_count", "window_start")

    def __init__(self, now: float) -> None:
        self.decisions: deque[RouteDecision] = deque()
        self.expires = 0.0
        self.size = FIRST_LEASE // 2  # decisions granted last
        self.ttl = 1.0  # seconds the router let the last lease live
        self.retry_at = 0.0
        self.window_start = now
        self.window_count = 0  # requests for this model in the current window
        self.last_rate = 0.0  # requests a second over the last full window

    def count_request(self, now: float) -> None:
        elapsed = now - self.window_start
        if elapsed >= DEMAND_WINDOW_S:
            self.last_rate = self.window_count / elapsed
            self.window_start, self.window_count = now, 0
        self.window_count += 1

    def rate(self, now: float) -> float:
        """Requests a second: the last full window's, or the current one's if that is higher."""
        return max(self.last_rate, self.window_count / max(now - self.window_start, DEMAND_WINDOW_S))


class RouteLeases:
    def __init__(self, bus: Bus, subject: str = ROUTE, timeout: float = 2.0) -> None:
        self.bus = bus
        self.subject = subject
        self.timeout = timeout
        self.traffic = TrafficCounter()
        self.leases = 0  # leases received (tests, debugging)
        self._held: dict[str, _Held] = {}
        self._wanted: dict[str, None] = {}  # models to ask a lease for, in order
        self._wake = anyio.Event()
        self._off_until = 0.0

    def take(self, model: str, prompt_tokens: int, max_tokens: int) -> RouteDecision | None:
        """The next decision held for ``model``, or None (ask the router). Counts the request as
        placed traffic when a decision is returned. A model asked for too rarely to use a lease
        before it expires gets none: its requests ask the router, as without leases."""
        now = time.monotonic()
        if now < self._off_until:
            return None
        held = self._held.get(model)
        if held is None:
            held = self._held[model] = _Held(now)
        held.count_request(now)
        if held.decisions and now >= held.expires:
            held.decisions.clear()
        if not held.decisions:
            if held.rate(now) * held.ttl / 2 >= MIN_LEASE:
                self._want(model, held, now)
            return None
        decision = held.decisions.popleft()
        if 2 * len(held.decisions) <= held.size:
            self._want(model, held, now)
        self.traffic.add(model, prompt_tokens, max_tokens)
        return decision

    def forget(self, model: str, worker_id: str) -> None:
        """A request just failed on ``worker_id``: use no more decisions naming it."""
        held = self._held.get(model)
        if held is not None and any(d.worker_id == worker_id for d in held.decisions):
            held.decisions = deque(d for d in held.decisions if d.worker_id != worker_id)

    def _want(self, model: str, held: _Held, now: float) -> None:
        if model not in self._wanted and now >= held.retry_at:
            self._wanted[model] = None
            self._wake.set()

    async def run(self) -> None:
        """Ask for leases as they are wanted, one at a time; report the traffic placed from them."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.traffic.run, self.bus)
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                while self._wanted:
                    model = next(iter(self._wanted))
                    try:
                        await self._refill(model)
                    finally:
                        self._wanted.pop(model, None)

    async def _refill(self, model: str) -> None:
        held = self._held[model]
        now = time.monotonic()
        # About half a lease's life of demand at the recent rate, and at most twice the last lease
        # (a burst of a few requests says little about the rate).
        size = min(MAX_LEASE, 2 * held.size, max(MIN_LEASE, math.ceil(held.rate(now) * held.ttl / 2)))
        try:
            msg = await self.bus.ask(self.subject, RouteLeaseRequest(model=model, count=size), self.timeout)
            reply = route_lease_reply_decoder.decode(msg.data)
        except (BusError, msgspec.DecodeError) as e:
            log.debug("route lease for %s not granted: %r", model, e)
            held.retry_at = time.monotonic() + RETRY_FAILED_S
            return
        except Exception:  # a bug here must not stop the frontend: its requests ask per request
            log.exception("asking for a route lease for %s failed", model)
            held.retry_at = time.monotonic() + RETRY_OFF_S
            return
        now = time.monotonic()
        if isinstance(reply, RouteError):
            if reply.code in (400, 409):  # the router decides per request (or knows no leases)
                log.info("the router grants no route leases (%s); asking it per request for %.0f s",
                         reply.message, RETRY_OFF_S)
                self._off_until = now + RETRY_OFF_S
            else:  # no worker right now: the requests asked per request get the error
                held.retry_at = now + RETRY_FAILED_S
            return
        self.leases += 1
        workers = reply.workers
        held.decisions.extend(workers[i] for i in reply.order if 0 <= i < len(workers))
        held.expires = now + reply.ttl
        held.size = len(reply.order)
        held.ttl = reply.ttl
