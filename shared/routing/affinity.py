"""Session affinity: a conversation (the caller's ``x-session-id``) stays on one decode worker.

Each routed request with a session id refreshes ``session -> worker`` for ``ttl`` seconds. The
next request of that session goes to the same worker while it is live (in discovery and not
excluded by the caller after a failure) and not full (its latest load report shows no request
waiting in its engine); otherwise it is routed as any other request and the session moves to the
worker chosen. The table is bounded (least recently used sessions go first) and lives in each
router (the router service's replicas and embedded routers each keep their own).
"""

from __future__ import annotations

import time
from collections import OrderedDict

from prometheus_client import Counter

from shared.messages import LoadReport, WorkerInfo

SESSIONS = Counter("baton_router_session_decisions_total",
                   "Requests with a session id: kept on their worker, new, or moved (worker gone or full)",
                   ["outcome"])

LOAD_REPORT_FRESH_S = 5.0  # an older load report says nothing about a worker's room
MAX_SESSIONS = 100_000


class SessionAffinity:
    def __init__(self, ttl: float, max_sessions: int = MAX_SESSIONS) -> None:
        self.ttl = ttl
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, tuple[str, float]] = OrderedDict()  # session -> (worker, expires)
        self._waiting: dict[str, tuple[float, int]] = {}  # worker -> (reported at, requests waiting)

    def __len__(self) -> int:
        return len(self._sessions)

    def on_load(self, report: LoadReport, now: float | None = None) -> None:
        if report.role != "decode":
            return
        now = time.monotonic() if now is None else now
        self._waiting[report.worker_id] = (now, report.waiting)
        if len(self._waiting) > 4096:  # workers that left stop reporting: forget them
            self._waiting = {w: v for w, v in self._waiting.items() if now - v[0] < LOAD_REPORT_FRESH_S}

    def full(self, worker_id: str, now: float) -> bool:
        at, waiting = self._waiting.get(worker_id, (0.0, 0))
        return waiting > 0 and now - at < LOAD_REPORT_FRESH_S

    def pinned(self, session_id: str, workers: list[WorkerInfo], now: float | None = None) -> WorkerInfo | None:
        """The session's worker if it may serve this request (``workers``: the live candidates);
        None for a new session, or one whose worker is gone or full (counted as moved)."""
        now = time.monotonic() if now is None else now
        entry = self._sessions.get(session_id)
        if entry is None or entry[1] <= now:
            SESSIONS.labels("new").inc()
            return None
        worker = next((w for w in workers if w.worker_id == entry[0]), None)
        if worker is None or self.full(worker.worker_id, now):
            SESSIONS.labels("moved").inc()
            return None
        SESSIONS.labels("kept").inc()
        return worker

    def remember(self, session_id: str, worker_id: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._sessions.pop(session_id, None)
        self._sessions[session_id] = (worker_id, now + self.ttl)
        # Every entry has the same ttl, so the least recently used is also the first to expire.
        while self._sessions and (len(self._sessions) > self.max_sessions or next(iter(self._sessions.values()))[1] <= now):
            self._sessions.popitem(last=False)
