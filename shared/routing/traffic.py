"""What a router tells the planner about traffic: new requests placed, per model, twice a second.

The planner meters the load it plans for (request rate, prompt and output lengths). It used to
subscribe beside the workers to every GenerateRequest, which cost a message, a wake-up and a
decode in the planner (and a copy in nats-server) per request, and let it read every prompt.
Every request is routed exactly once by some router (a router service replica, a frontend's
embedded one, or a frontend using decisions a router leased it: shared/routing/lease.py), so the
routers count instead and publish one :class:`TrafficReport` per
:data:`REPORT_INTERVAL_S` while busy. Each report carries the time it covers, measured by its
sender, so the planner computes exact per-router rates whatever the phase of its own interval.
After the last request a router keeps sending empty reports for :data:`IDLE_TAIL_S`, so the
planner sees the rate fall to zero, then goes quiet.

Re-routes (a request migrated to another worker after a failure, which names the workers to
avoid) are not new traffic and are not counted.
"""

from __future__ import annotations

import logging
import os
import socket
import time

import anyio

from shared.bus import Bus
from shared.messages import ModelTraffic, RouteRequest, TrafficReport
from shared.subjects import TRAFFIC

log = logging.getLogger("baton.router")

REPORT_INTERVAL_S = 0.5
IDLE_TAIL_S = 10.0  # empty reports after the last request (longer than a planner interval)


class TrafficCounter:
    def __init__(self, source: str = "", interval: float = REPORT_INTERVAL_S, idle_tail: float = IDLE_TAIL_S) -> None:
        self.source = source or f"{socket.gethostname()}:{os.getpid()}"
        self.interval = interval
        self.idle_tail = idle_tail
        self._counts: dict[str, list[int]] = {}  # model -> [requests, prompt tokens, output tokens]
        self._since = time.monotonic()
        self._last_busy = -1e18

    def count(self, req: RouteRequest) -> None:
        """A request placed (the caller checked it is new, not a re-route)."""
        self.add(req.model, len(req.token_ids), req.max_tokens)

    def add(self, model: str, prompt_tokens: int, output_tokens: int) -> None:
        """A new request placed for ``model``: its prompt length and output budget."""
        c = self._counts.get(model)
        if c is None:
            c = self._counts[model] = [0, 0, 0]
        c[0] += 1
        c[1] += prompt_tokens
        c[2] += output_tokens

    def take(self, now: float | None = None) -> TrafficReport | None:
        """The report for the interval that ends now, or None when there is nothing to say (idle
        for longer than the tail)."""
        now = time.monotonic() if now is None else now
        counts, self._counts = self._counts, {}
        covered, self._since = now - self._since, now
        if counts:
            self._last_busy = now
        elif now - self._last_busy > self.idle_tail:
            return None
        return TrafficReport(source=self.source, interval=covered, models=[
            ModelTraffic(model=m, requests=c[0], prompt_tokens=c[1], output_tokens=c[2]) for m, c in counts.items()])

    async def run(self, bus: Bus) -> None:
        while True:
            await anyio.sleep(self.interval)
            report = self.take()
            if report is None:
                continue
            try:
                await bus.publish(TRAFFIC, report)
            except Exception as e:  # NATS away: this interval's counts are lost, the planner sees a dip
                log.debug("traffic report not sent: %r", e)
