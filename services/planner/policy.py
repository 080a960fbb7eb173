"""Scaling policies: what the planner sees in one interval -> how many workers each role should have.

A policy only *proposes* a replica count per role, with its reason. The :class:`Stabilizer` turns
proposals into decisions: it clamps to min/max, asks that a proposal persist for N consecutive
intervals before it acts (so one spike does not flap the fleet), keeps cooldowns between changes,
and does not scale up again while the workers it just asked for are still starting.

Two policies:

* :class:`LoadPolicy`: thresholds on smoothed (EWMA) backlog per worker and KV use: above the
  up threshold -> grow (by up to ``max_step_up`` times), below the down thresholds -> shrink by one.
* :class:`SlaPolicy`: targets for TTFT and ITL. From a profile of one worker's measured capacity
  (``baton profile``) and a short-term forecast of request rate and prompt/output lengths it
  computes how many workers keep both targets, plus enough extra to drain the current backlog.

Everything here is pure (no NATS, no clock): the planner service feeds :class:`Signals` in.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from services.planner.forecast import Forecaster
from services.planner.profile import WorkerProfile
from services.planner.signals import ROLES, Proposal, Role, RoleSignals, Signals, Traffic

__all__ = ["ROLES", "Proposal", "Role", "RoleSignals", "Signals", "Traffic"]

class Policy(Protocol):
    name: str

    def propose(self, signals: Signals, current: Mapping[Role, int]) -> dict[Role, Proposal]:
        """Replicas each role should have now, given the fleet it has (``current``)."""
        ...


class HoldPolicy:
    """Keeps the fleet as it is (``--policy none``): the planner only observes and keeps workers alive."""

    name = "none"

    def propose(self, signals: Signals, current: Mapping[Role, int]) -> dict[Role, Proposal]:
        return {r: Proposal(r, current[r], "hold") for r in ROLES}


# --- the load policy -------------------------------------------------------------------------


class Ewma:
    """Exponentially weighted moving average; the first sample seeds it."""

    __slots__ = ("alpha", "value")

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.value: float | None = None

    def update(self, x: float) -> float:
        self.value = x if self.value is None else self.alpha * x + (1 - self.alpha) * self.value
        return self.value


@dataclass
class LoadThresholds:
    decode_queue_up: float = 2.0  # waiting requests per decode worker above which to grow
    decode_queue_down: float = 0.2  # ... below which (with KV below kv_down) to shrink
    kv_up: float = 0.85  # mean KV use above which to grow
    kv_down: float = 0.5  # KV use, projected onto one worker fewer, below which shrinking is safe
    prefill_queue_up: float = 4.0  # queued prefill jobs per prefill worker above which to grow
    prefill_queue_down: float = 0.5
    alpha: float = 0.5  # EWMA weight of the newest sample
    max_step_up: float = 2.0  # grow at most to this multiple of the fleet per decision (and at least +1)


class LoadPolicy:
    """Thresholds on smoothed backlog per worker and KV use."""

    name = "load"

    def __init__(self, thresholds: LoadThresholds | None = None) -> None:
        self.t = thresholds or LoadThresholds()
        a = self.t.alpha
        self._decode_queue = Ewma(a)
        self._kv = Ewma(a)
        self._prefill_queue = Ewma(a)

    def _grow(self, n: int, ratio: float) -> int:
        # Proportional to how far over the threshold we are, capped: a big backlog jumps, a small one adds one.
        factor = min(ratio, self.t.max_step_up)
        return max(n + 1, math.ceil(n * factor))

    def propose(self, signals: Signals, current: Mapping[Role, int]) -> dict[Role, Proposal]:
        t = self.t
        out: dict[Role, Proposal] = {}

        d, n = signals.decode, current["decode"]
        # Per worker over the fleet we asked for: workers still starting will take their share soon.
        per = max(n, d.ready, 1)
        q = self._decode_queue.update(d.waiting / per)
        kv = self._kv.update(d.kv_usage)
        if q > t.decode_queue_up or kv > t.kv_up:
            ratio = max(q / t.decode_queue_up, kv / t.kv_up if t.kv_up > 0 else 0.0)
            out["decode"] = Proposal("decode", self._grow(n, ratio),
                                     f"load: {q:.2f} waiting/worker (up>{t.decode_queue_up:g}), kv {kv:.2f} (up>{t.kv_up:g})")
        elif n > 0 and q < t.decode_queue_down and (kv * per / max(per - 1, 1)) < t.kv_down:
            out["decode"] = Proposal("decode", n - 1,
                                     f"load: {q:.2f} waiting/worker (down<{t.decode_queue_down:g}), kv {kv:.2f} "
                                     f"-> {kv * per / max(per - 1, 1):.2f} on one worker fewer (down<{t.kv_down:g})")
        else:
            out["decode"] = Proposal("decode", n, f"load: {q:.2f} waiting/worker, kv {kv:.2f}: within band")

        p, m = signals.prefill, current["prefill"]
        backlog = p.queue_pending + p.queue_inflight
        pq = self._prefill_queue.update(backlog / max(m, p.ready, 1))
        if m == 0 and backlog > 0:
            out["prefill"] = Proposal("prefill", 1, f"load: {backlog} prefill jobs queued and no prefill worker")
        elif pq > t.prefill_queue_up:
            out["prefill"] = Proposal("prefill", self._grow(m, pq / t.prefill_queue_up),
                                      f"load: {pq:.2f} queued jobs/worker (up>{t.prefill_queue_up:g})")
        elif m > 0 and pq < t.prefill_queue_down:
            out["prefill"] = Proposal("prefill", m - 1,
                                      f"load: {pq:.2f} queued jobs/worker (down<{t.prefill_queue_down:g})")
        else:
            out["prefill"] = Proposal("prefill", m, f"load: {pq:.2f} queued jobs/worker: within band")
        return out


# --- the SLA policy --------------------------------------------------------------------------


@dataclass
class SlaTargets:
    ttft_s: float = 0.5  # time to first token to keep
    itl_s: float = 0.05  # inter-token latency to keep
    max_utilization: float = 0.9  # never plan a worker busier than this
    drain_window_s: float = 10.0  # extra workers to clear the current backlog within this long
    forecast_horizon: float = 1.0  # intervals ahead to forecast (about one worker start-up)


class SlaPolicy:
    """Sizes each fleet from measured per-worker capacity and a forecast of the coming load."""

    name = "sla"

    def __init__(self, profile: WorkerProfile, targets: SlaTargets | None = None,
                 forecaster: Forecaster | None = None) -> None:
        self.profile = profile
        self.targets = targets or SlaTargets()
        self.forecaster = forecaster or Forecaster()

    def propose(self, signals: Signals, current: Mapping[Role, int]) -> dict[Role, Proposal]:
        tg = self.targets
        fc = self.forecaster
        fc.update(signals.traffic)
        pred = fc.predict(tg.forecast_horizon)
        prof = self.profile
        out: dict[Role, Proposal] = {}

        # Decode. Requests whose prompt the prefill fleet computes cost a decode worker no prefill.
        rate = pred.request_rate
        share = min(1.0, pred.prefill_job_rate / rate) if rate > 0 else 0.0
        cap = prof.decode_capacity(pred.prompt_tokens, pred.output_tokens, tg.itl_s, tg.ttft_s,
                                   prefill_share=share, max_util=tg.max_utilization)
        d = signals.decode
        backlog_ws = d.waiting * cap.decode_ws_per_request
        backlog_ws += (1 - share) * d.prefill_tokens_queued / prof.prefill_tokens_per_s(max(pred.prompt_tokens, 1.0))
        steady = rate / cap.requests_per_s if cap.requests_per_s > 0 else 0.0
        drain = backlog_ws / tg.drain_window_s
        n = math.ceil(steady + drain - 1e-6)
        out["decode"] = Proposal(
            "decode", n,
            f"sla: {rate:.2f} req/s (isl {pred.prompt_tokens:.0f}, osl {pred.output_tokens:.0f}) / "
            f"{cap.requests_per_s:.2f} req/s per worker (batch {cap.concurrency:.0f}, util {cap.utilization:.2f}, "
            f"ITL<={tg.itl_s * 1e3:.0f}ms, TTFT<={tg.ttft_s * 1e3:.0f}ms) = {steady:.2f}"
            f" + backlog {d.waiting} req/{d.prefill_tokens_queued} tok = {drain:.2f} workers",
        )

        # Prefill: jobs through the JetStream queue.
        p = signals.prefill
        jrate = pred.prefill_job_rate
        jtokens = max(pred.prefill_job_tokens, 1.0)
        pcap = prof.prefill_capacity(jtokens, tg.ttft_s, max_util=tg.max_utilization)
        jsteady = jrate / pcap if pcap > 0 else 0.0
        jdrain = (p.queue_pending + p.queue_inflight) * jtokens / prof.prefill_tokens_per_s(jtokens) / tg.drain_window_s
        m = math.ceil(jsteady + jdrain - 1e-6)
        out["prefill"] = Proposal(
            "prefill", m,
            f"sla: {jrate:.2f} jobs/s (isl {jtokens:.0f}) / {pcap:.2f} jobs/s per worker = {jsteady:.2f}"
            f" + backlog {p.queue_pending + p.queue_inflight} jobs = {jdrain:.2f} workers",
        )
        return out


# --- from proposals to decisions ---------------------------------------------------------------


@dataclass
class Damping:
    up_intervals: int = 2  # a larger fleet must be proposed this many intervals in a row
    down_intervals: int = 5  # ... a smaller one this many
    up_cooldown: float = 10.0  # seconds after a scale-up before the next scale-up
    down_cooldown: float = 30.0  # seconds after any change before a scale-down
    startup_grace: float = 60.0  # wait at most this long for asked-for workers to register before growing again


@dataclass(slots=True)
class Change:
    role: Role
    before: int
    after: int
    reason: str


@dataclass
class _RoleState:
    history: deque[int]
    last_change: float = -math.inf
    last_up: float = -math.inf


class Stabilizer:
    """Clamps proposals to limits and damps them in time; returns a :class:`Change` when one is due."""

    def __init__(self, limits: Mapping[Role, tuple[int, int]], damping: Damping | None = None) -> None:
        self.limits = dict(limits)
        self.damping = damping or Damping()
        size = max(self.damping.up_intervals, self.damping.down_intervals, 1)
        self._state = {r: _RoleState(deque(maxlen=size)) for r in ROLES}

    def clamp(self, role: Role, n: int) -> int:
        lo, hi = self.limits[role]
        return max(lo, min(hi, n))

    def decide(self, proposal: Proposal, current: int, ready: int, now: float) -> Change | None:
        role = proposal.role
        st = self._state[role]
        dm = self.damping
        target = self.clamp(role, proposal.replicas)
        st.history.append(target)
        if current != self.clamp(role, current):  # outside the limits (e.g. at start): fix at once
            return self._change(role, current, self.clamp(role, current), "limits", now)
        if target > current:
            recent = list(st.history)[-dm.up_intervals:]
            if len(recent) < dm.up_intervals or min(recent) <= current:
                return None  # not sustained yet
            if now - st.last_up < dm.up_cooldown:
                return None
            if ready < current and now - st.last_change < dm.startup_grace:
                return None  # the workers asked for last time are still starting: judge them first
            # The level sustained over the window, not the latest (possibly spiky) value.
            return self._change(role, current, min(recent), proposal.reason, now)
        if target < current:
            recent = list(st.history)[-dm.down_intervals:]
            if len(recent) < dm.down_intervals or max(recent) >= current:
                return None
            if now - st.last_change < dm.down_cooldown:
                return None
            return self._change(role, current, max(recent), proposal.reason, now)
        return None

    def _change(self, role: Role, before: int, after: int, reason: str, now: float) -> Change:
        st = self._state[role]
        st.last_change = now
        if after > before:
            st.last_up = now
        st.history.clear()  # judge the new fleet on fresh evidence
        return Change(role, before, after, reason)
