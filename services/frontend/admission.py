"""Admission: which request goes to the workers next when the fleet is saturated.

A request is admitted at once while the fleet has room. When it has none (this frontend already
has ``max_running`` requests at the workers, or every decode worker's load report says requests
are waiting in its engine), it waits in one :class:`FairQueue`, ordered by

1. its priority (vLLM's: lower is served first), then
2. its tenant's weighted fair share: start-time fair queuing over tenants (API keys; callers
   without a key are one tenant), each request costing 1/weight of its tenant's virtual time, so
   a tenant sending ten times as many requests gets no more than its share while others wait,
   then
3. arrival.

``reserved`` of the ``max_running`` slots are kept for requests of a priority above the default
(below 0): a request already at a worker cannot be taken back, so these slots are what lets a
high-priority request start without waiting for low-priority ones to finish.

The wait is bounded: past ``queue_timeout`` (or with ``max_queued`` requests already waiting)
the answer is 503 with Retry-After. Tokens a minute per tenant (prompt + completion, counted as
they are used) are checked before a request queues and charged as it runs.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
from prometheus_client import Counter, Gauge

from services.frontend.access import Tenant, TokenRateLimiter
from services.frontend.metrics import LoopHistogram
from services.frontend.openai_api import RequestError
from services.frontend.request import ValidatedRequest
from shared.messages import LoadReport

QUEUED = Gauge("baton_frontend_admission_queued", "Requests waiting for admission")
RUNNING = Gauge("baton_frontend_admission_running", "Requests admitted and not yet finished")
WAIT_SECONDS = LoopHistogram("baton_frontend_admission_wait_seconds", "Time a request waited for admission",
                         buckets=(0.001, 0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
REFUSED = Counter("baton_frontend_admission_refused_total", "Requests refused by admission", ["reason"])

# A load report older than this says nothing about a worker any more.
LOAD_REPORT_FRESH_S = 5.0
HIGH_PRIORITY_BELOW = 0  # priorities below this may take the reserved slots


@dataclass
class AdmissionSettings:
    max_running: int = 0  # requests this frontend has at the workers at once; 0: no cap
    reserved: int = 0  # of max_running, slots only requests with priority < 0 may take
    queue_timeout: float = 30.0  # longest wait for admission; then 503 with Retry-After
    max_queued: int = 1024  # requests waiting at once; beyond, 503 at once
    worker_waiting: int = 0  # the fleet is full when every decode worker reports this many waiting; 0: off
    tenant_tpm: int = 0  # tokens a minute per tenant unless its key sets tpm=; 0: no limit

    def check(self) -> None:
        if self.max_running < 0 or self.reserved < 0 or self.max_queued < 0 or self.worker_waiting < 0:
            raise ValueError("admission limits must be >= 0")
        if self.reserved and self.reserved >= self.max_running:
            raise ValueError("--admission-reserved must be smaller than --admission-max-running")
        if not self.queue_timeout > 0:
            raise ValueError("--admission-queue-timeout must be > 0")


@dataclass(eq=False)
class Ticket:
    """One request waiting for admission."""

    priority: int
    tenant: str
    weight: float
    seq: int = 0
    start: float = 0.0  # virtual start and finish tags (start-time fair queuing)
    finish: float = 0.0
    granted: bool = False
    dropped: bool = False  # timed out or cancelled while waiting
    ready: anyio.Event = field(default_factory=anyio.Event)


class FairQueue:
    """Tickets ordered by (priority, virtual finish tag, arrival): priority first, then weighted
    fair queuing among tenants. Dropped tickets are skipped lazily."""

    PRUNE_AT = 4096  # tenants remembered before those with nothing ahead of the clock are forgotten

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, Ticket]] = []
        self._last_finish: dict[str, float] = {}  # tenant -> finish tag of its latest ticket
        self._vtime = 0.0  # start tag of the latest ticket served
        self._seq = itertools.count()
        self._live = 0

    def __len__(self) -> int:
        return self._live

    def push(self, ticket: Ticket) -> None:
        ticket.seq = next(self._seq)
        ticket.start = max(self._vtime, self._last_finish.get(ticket.tenant, 0.0))
        ticket.finish = ticket.start + 1.0 / ticket.weight
        self._last_finish[ticket.tenant] = ticket.finish
        heapq.heappush(self._heap, (ticket.priority, ticket.finish, ticket.seq, ticket))
        self._live += 1

    def peek(self) -> Ticket | None:
        while self._heap and self._heap[0][3].dropped:
            heapq.heappop(self._heap)
        return self._heap[0][3] if self._heap else None

    def pop(self) -> Ticket | None:
        ticket = self.peek()
        if ticket is None:
            return None
        heapq.heappop(self._heap)
        self._live -= 1
        self._vtime = max(self._vtime, ticket.start)
        if len(self._last_finish) > self.PRUNE_AT:
            # A tenant whose last finish tag is behind the clock starts from the clock anyway.
            self._last_finish = {t: f for t, f in self._last_finish.items() if f > self._vtime}
        return ticket

    def drop(self, ticket: Ticket) -> None:
        if not ticket.dropped and not ticket.granted:
            ticket.dropped = True
            self._live -= 1


class Admission:
    """The frontend's admission queue, shared by the HTTP and NATS APIs."""

    def __init__(self, settings: AdmissionSettings, live_workers: Callable[[], list[str]] | None = None) -> None:
        settings.check()
        self.settings = settings
        self.queue = FairQueue()
        self.running = 0
        self.tokens = TokenRateLimiter()
        self.live_workers = live_workers  # ids of the decode workers serving our model
        self._loads: dict[str, tuple[float, int]] = {}  # worker -> (when reported, requests waiting)
        # Neither a cap nor a fleet check: every request starts at once (the default's fast path).
        self._unlimited = not settings.max_running and not settings.worker_waiting

    # --- the fleet's room ----------------------------------------------------------------------

    def on_load(self, report: LoadReport) -> None:
        """A decode worker's load report: the fleet may have room again."""
        if report.role != "decode" or not self.settings.worker_waiting:
            return
        self._loads[report.worker_id] = (time.monotonic(), report.waiting)
        self._dispatch()

    def fleet_full(self) -> bool:
        """Every live decode worker (with a fresh report) has ``worker_waiting`` requests waiting."""
        if not self.settings.worker_waiting or self.live_workers is None:
            return False
        now = time.monotonic()
        live = self.live_workers()
        fresh = [self._loads[w][1] for w in live if w in self._loads and now - self._loads[w][0] < LOAD_REPORT_FRESH_S]
        if len(self._loads) > 4 * len(live) + 16:  # forget workers that left
            self._loads = {w: v for w, v in self._loads.items() if w in set(live)}
        return bool(fresh) and len(fresh) == len(live) and min(fresh) >= self.settings.worker_waiting

    def _may_start(self, priority: int) -> bool:
        s = self.settings
        if s.max_running:
            cap = s.max_running if priority < HIGH_PRIORITY_BELOW else s.max_running - s.reserved
            if self.running >= cap:
                return False
        # One request at a time always goes, so a full fleet still drains this frontend's queue.
        return self.running == 0 or not self.fleet_full()

    def _dispatch(self) -> None:
        while (ticket := self.queue.peek()) is not None and self._may_start(ticket.priority):
            self.queue.pop()
            ticket.granted = True
            self.running += 1
            ticket.ready.set()
        QUEUED.set(len(self.queue))
        RUNNING.set(self.running)

    # --- a request's way through --------------------------------------------------------------

    def slot(self, tenant: Tenant, priority: int) -> _Slot:
        """``async with``: hold one of the fleet's slots for the body; wait for it in the queue."""
        return _Slot(self, tenant, priority)

    def admit(self, req: ValidatedRequest, tenant: Tenant) -> Admitted:
        """``async with``: ``req`` admitted (its tenant's tokens a minute checked, a slot held) for
        the body; :meth:`Admitted.used` charges the tokens it generates."""
        return Admitted(self, req, tenant, tenant.tpm or self.settings.tenant_tpm)

    async def _acquire(self, tenant: Tenant, priority: int) -> None:
        s = self.settings
        if self._unlimited:  # no cap, no fleet check: nothing ever queues, so no ticket either
            self.running += 1
            RUNNING.set(self.running)
            WAIT_SECONDS.observe(0.0)
            return
        if len(self.queue) >= s.max_queued and not self._may_start(priority):
            REFUSED.labels("queue_full").inc()
            raise _overloaded(f"{len(self.queue)} requests are already waiting for admission", s.queue_timeout)
        ticket = Ticket(priority, tenant.name, tenant.weight)
        self.queue.push(ticket)
        t0 = time.perf_counter()
        try:
            self._dispatch()
            if not ticket.granted:
                with anyio.move_on_after(s.queue_timeout):
                    await ticket.ready.wait()
        except BaseException:  # the caller left while waiting (or just as its turn came)
            if ticket.granted:
                self._release()
            else:
                self._drop(ticket)
            raise
        if not ticket.granted:
            self._drop(ticket)
            REFUSED.labels("queue_timeout").inc()
            raise _overloaded(f"no room in the fleet within {s.queue_timeout:g}s", s.queue_timeout)
        WAIT_SECONDS.observe(time.perf_counter() - t0)

    def _drop(self, ticket: Ticket) -> None:
        self.queue.drop(ticket)
        QUEUED.set(len(self.queue))

    def _release(self) -> None:
        self.running -= 1
        if self._unlimited:
            RUNNING.set(self.running)
        else:
            self._dispatch()


class _Slot:
    """One hold on a slot, as an ``async with`` (a class, not a generator: this is per request)."""

    __slots__ = ("_admission", "_priority", "_tenant")

    def __init__(self, admission: Admission, tenant: Tenant, priority: int) -> None:
        self._admission = admission
        self._tenant = tenant
        self._priority = priority

    async def __aenter__(self) -> None:
        await self._admission._acquire(self._tenant, self._priority)

    async def __aexit__(self, *exc: object) -> None:
        self._admission._release()


class Admitted:
    """One request's admission, as an ``async with``: its tenant's tokens a minute checked and its
    prompt charged, a slot held until the body ends. The caller reports the tokens it generates
    with :meth:`used` (no wrapper around the request's deltas: one async-generator hop less per delta)."""

    __slots__ = ("_admission", "_req", "_tenant", "tpm")

    def __init__(self, admission: Admission, req: ValidatedRequest, tenant: Tenant, tpm: int) -> None:
        self._admission = admission
        self._req = req
        self._tenant = tenant
        self.tpm = tpm  # 0: no tokens-a-minute limit

    async def __aenter__(self) -> Admitted:
        adm, tpm = self._admission, self.tpm
        prompt = len(self._req.token_ids)
        if tpm:
            try:
                adm.tokens.check(self._tenant.name, tpm, prompt)
            except RequestError:
                REFUSED.labels("tpm").inc()
                raise
        await adm._acquire(self._tenant, self._req.priority)
        if tpm:
            try:
                adm.tokens.charge(self._tenant.name, tpm, prompt)
            except BaseException:
                adm._release()
                raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._admission._release()

    def used(self, tokens: int) -> None:
        """``tokens`` more generated for this request: charged to its tenant's tokens a minute."""
        if self.tpm and tokens:
            self._admission.tokens.charge(self._tenant.name, self.tpm, tokens)


def _overloaded(why: str, queue_timeout: float) -> RequestError:
    retry = max(1, math.ceil(min(queue_timeout, 10.0)))
    err = RequestError(503, f"overloaded: {why}; retry in {retry}s", type="service_unavailable", code="overloaded")
    err.headers = [(b"retry-after", str(retry).encode())]
    return err
