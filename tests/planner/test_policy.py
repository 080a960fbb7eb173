"""Policies, the stabilizer and the forecast, with a fake clock: no NATS, no processes."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.planner.forecast import Forecaster, Holt, TrafficMeter
from services.planner.policy import (
    Damping,
    LoadPolicy,
    LoadThresholds,
    Proposal,
    SlaPolicy,
    SlaTargets,
    Stabilizer,
)
from services.planner.profile import DecodePoint, PrefillPoint, WorkerProfile
from services.planner.signals import RoleSignals, Signals, Traffic

LIMITS = {"decode": (1, 6), "prefill": (0, 4)}


def sig(t: float = 0.0, waiting: int = 0, ready: int = 1, kv: float = 0.0, pending: int = 0,
        prefill_ready: int = 0, traffic: Traffic | None = None, queued_tokens: int = 0) -> Signals:
    return Signals(timestamp=t, decode=RoleSignals(ready=ready, waiting=waiting, kv_usage=kv,
                                                   prefill_tokens_queued=queued_tokens),
                   prefill=RoleSignals(ready=prefill_ready, queue_pending=pending), traffic=traffic or Traffic())


class Sim:
    """Policy + stabilizer, applying each change at once (as an instant connector would)."""

    def __init__(self, policy, damping: Damping, limits=LIMITS, start: dict | None = None) -> None:
        self.policy = policy
        self.stab = Stabilizer(limits, damping)
        self.current = dict(start or {"decode": 1, "prefill": 0})
        self.changes: list[tuple[float, str, int, int]] = []

    def tick(self, now: float, s: Signals) -> None:
        props = self.policy.propose(s, self.current)
        for role in ("decode", "prefill"):
            ready = s.role(role).ready
            c = self.stab.decide(props[role], self.current[role], ready, now)
            if c is not None:
                self.changes.append((now, role, c.before, c.after))
                self.current[role] = c.after


FAST = Damping(up_intervals=2, down_intervals=3, up_cooldown=5, down_cooldown=10, startup_grace=30)


def test_load_policy_one_spike_does_not_flap() -> None:
    sim = Sim(LoadPolicy(LoadThresholds(alpha=1.0)), FAST)
    sim.tick(0, sig(waiting=0))
    sim.tick(1, sig(waiting=20))  # one interval of backlog
    sim.tick(2, sig(waiting=0))
    sim.tick(3, sig(waiting=0))
    assert sim.changes == []


def test_load_policy_sustained_backlog_grows_capped_then_shrinks_one_at_a_time() -> None:
    sim = Sim(LoadPolicy(LoadThresholds(alpha=1.0, decode_queue_up=2, max_step_up=2)), FAST)
    sim.tick(0, sig(waiting=30))
    sim.tick(1, sig(waiting=30))
    assert sim.changes == [(1, "decode", 1, 2)]  # at most doubling, however deep the queue
    sim.tick(2, sig(waiting=30, ready=1))  # the new worker has not registered yet: wait for it
    sim.tick(3, sig(waiting=30, ready=1))
    assert len(sim.changes) == 1
    sim.tick(6, sig(waiting=30, ready=2))  # registered, and the backlog has persisted since t=2
    assert sim.changes[-1] == (6, "decode", 2, 4)
    # Idle: one worker fewer per decision, down_intervals in a row, down_cooldown apart, to the minimum.
    t = 7.0
    while sim.current["decode"] > 1 and t < 100:
        sim.tick(t, sig(waiting=0, ready=sim.current["decode"]))
        t += 1
    downs = [c for c in sim.changes if c[3] < c[2]]
    assert [(b, a) for _, _, b, a in downs] == [(4, 3), (3, 2), (2, 1)]
    assert downs[0][0] - 6 >= FAST.down_cooldown
    assert all(b[0] - a[0] >= FAST.down_cooldown for a, b in itertools.pairwise(downs))


def test_load_policy_kv_pressure_and_kv_guard_on_scale_down() -> None:
    pol = LoadPolicy(LoadThresholds(alpha=1.0, kv_up=0.8, kv_down=0.5))
    assert pol.propose(sig(kv=0.95, ready=2), {"decode": 2, "prefill": 0})["decode"].replicas == 3
    # No waiting, but 0.3 KV on 2 workers is 0.6 on one: too full to shrink.
    pol = LoadPolicy(LoadThresholds(alpha=1.0, kv_up=0.8, kv_down=0.5))
    assert pol.propose(sig(kv=0.3, ready=2), {"decode": 2, "prefill": 0})["decode"].replicas == 2
    pol = LoadPolicy(LoadThresholds(alpha=1.0, kv_up=0.8, kv_down=0.5))
    assert pol.propose(sig(kv=0.1, ready=2), {"decode": 2, "prefill": 0})["decode"].replicas == 1


def test_load_policy_prefill_queue() -> None:
    pol = LoadPolicy(LoadThresholds(alpha=1.0, prefill_queue_up=4))
    p = pol.propose(sig(pending=5), {"decode": 1, "prefill": 0})["prefill"]
    assert p.replicas == 1 and "no prefill worker" in p.reason
    p = pol.propose(sig(pending=40, prefill_ready=2), {"decode": 1, "prefill": 2})["prefill"]
    assert p.replicas == 4
    p = pol.propose(sig(pending=0, prefill_ready=2), {"decode": 1, "prefill": 2})["prefill"]
    assert p.replicas == 1


def test_stabilizer_limits_and_cooldown() -> None:
    stab = Stabilizer(LIMITS, Damping(up_intervals=1, down_intervals=1, up_cooldown=10, down_cooldown=10))
    c = stab.decide(Proposal("decode", 50, "x"), 1, 1, now=0)
    assert c is not None and c.after == 6  # clamped to max
    assert stab.decide(Proposal("decode", 1, "x"), 6, 6, now=5) is None  # cooldown
    c = stab.decide(Proposal("decode", 0, "x"), 6, 6, now=11)
    assert c is not None and c.after == 1  # clamped to min
    c = stab.decide(Proposal("prefill", 2, "x"), 9, 9, now=0)
    assert c is not None and (c.before, c.after, c.reason) == (9, 4, "limits")


def test_down_takes_the_highest_proposal_of_the_window() -> None:
    stab = Stabilizer(LIMITS, Damping(up_intervals=1, down_intervals=3, down_cooldown=0))
    assert stab.decide(Proposal("decode", 1, ""), 5, 5, 0) is None
    assert stab.decide(Proposal("decode", 3, ""), 5, 5, 1) is None
    c = stab.decide(Proposal("decode", 2, ""), 5, 5, 2)
    assert c is not None and c.after == 3


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.floats(0, 1)), min_size=1, max_size=60))
def test_load_policy_never_leaves_limits_nor_changes_faster_than_cooldowns(samples) -> None:
    damping = Damping(up_intervals=2, down_intervals=3, up_cooldown=4, down_cooldown=6, startup_grace=0)
    sim = Sim(LoadPolicy(LoadThresholds(alpha=0.5)), damping)
    for t, (waiting, kv) in enumerate(samples):
        sim.tick(float(t), sig(waiting=waiting, kv=kv, ready=sim.current["decode"]))
        assert 1 <= sim.current["decode"] <= 6
    changes = [c for c in sim.changes if c[1] == "decode"]
    for a, b in itertools.pairwise(changes):
        if b[3] < b[2]:  # a scale-down waits down_cooldown after any change
            assert b[0] - a[0] >= damping.down_cooldown
    ups = [c for c in changes if c[3] > c[2]]
    for a, b in itertools.pairwise(ups):  # a scale-up waits up_cooldown after the last one (not after a down)
        assert b[0] - a[0] >= damping.up_cooldown


# --- SLA -------------------------------------------------------------------------------------


def profile() -> WorkerProfile:
    # 10k prompt tokens/s; a lone 500-token prompt takes 0.1 s; ITL 20 ms at c=1 .. 60 ms at c=32.
    return WorkerProfile(
        engine="mocker", model="m", block_size=16, kv_blocks_total=100_000, max_num_seqs=64,
        prefill=[PrefillPoint(isl=100, ttft_s=0.02, tokens_per_s=10_000),
                 PrefillPoint(isl=1000, ttft_s=0.2, tokens_per_s=10_000)],
        decode=[DecodePoint(concurrency=1, itl_s=0.02, tokens_per_s=50),
                DecodePoint(concurrency=16, itl_s=0.04, tokens_per_s=400),
                DecodePoint(concurrency=32, itl_s=0.06, tokens_per_s=533)],
    )


def test_profile_interpolation_and_capacity_by_hand() -> None:
    p = profile()
    assert p.ttft0(500) == pytest.approx(0.1)
    assert p.itl(24) == pytest.approx(0.05)
    assert p.max_concurrency(0.05) == pytest.approx(24)
    assert p.max_concurrency(0.01) == 1  # even one sequence misses it: plan one per batch
    assert p.max_concurrency(1.0) == 32  # beyond the profile: its largest batch
    assert p.max_concurrency(1.0, isl=1584, osl=16) == 32
    small_kv = WorkerProfile(**{**{f: getattr(p, f) for f in p.__struct_fields__}, "kv_blocks_total": 200})
    assert small_kv.max_concurrency(1.0, isl=1584, osl=16) == 2  # 100 blocks a sequence
    cap = p.decode_capacity(isl=500, osl=100, itl_target=0.05, ttft_target=0.5, max_util=0.9)
    # c=24, ITL 50 ms: decode 100*0.05/24 s + prefill 500/10k s per request; util = 1 - 0.1/0.5 = 0.8.
    ws = 100 * 0.05 / 24 + 0.05
    assert cap.utilization == pytest.approx(0.8)
    assert cap.ws_per_request == pytest.approx(ws)
    assert cap.requests_per_s == pytest.approx(min(0.8 / ws, 24 / (0.1 + 100 * 0.05)))


def test_sla_policy_sizes_for_rate_and_backlog() -> None:
    targets = SlaTargets(ttft_s=0.5, itl_s=0.05, drain_window_s=10)
    pol = SlaPolicy(profile(), targets)
    cur = {"decode": 1, "prefill": 0}
    quiet = pol.propose(sig(traffic=Traffic(interval=1, requests=0)), cur)
    assert quiet["decode"].replicas == 0 and quiet["prefill"].replicas == 0  # limits lift it to the min
    pol = SlaPolicy(profile(), targets)
    cap = profile().decode_capacity(500, 100, 0.05, 0.5).requests_per_s
    busy = pol.propose(sig(traffic=Traffic(interval=1, requests=20, prompt_tokens=500, output_tokens=100)), cur)
    assert busy["decode"].replicas == math.ceil(20 / cap)
    assert "req/s" in busy["decode"].reason
    # The same rate with a backlog of 50 waiting requests asks for more.
    pol = SlaPolicy(profile(), targets)
    backlog = pol.propose(sig(waiting=50, traffic=Traffic(interval=1, requests=20, prompt_tokens=500,
                                                          output_tokens=100)), cur)
    assert backlog["decode"].replicas > busy["decode"].replicas


def test_sla_policy_counts_prefill_jobs_for_the_prefill_fleet() -> None:
    pol = SlaPolicy(profile(), SlaTargets(ttft_s=0.5))
    t = Traffic(interval=1, requests=10, prompt_tokens=1000, output_tokens=10, prefill_jobs=10,
                prefill_job_tokens=1000)
    out = pol.propose(sig(traffic=t), {"decode": 1, "prefill": 1})
    # 10 jobs/s * 1000 tokens at 10k tok/s = 1 worker fully busy; TTFT 0.2 of 0.5 -> util 0.6 -> 2 workers.
    assert out["prefill"].replicas == 2


def test_holt_follows_a_trend_and_forecaster_reacts_to_a_step() -> None:
    h = Holt(alpha=0.5, beta=0.5)
    for x in range(10):
        h.update(float(x))
    assert h.forecast(1) == pytest.approx(10, abs=1.0)
    f = Forecaster()
    for _ in range(5):
        f.update(Traffic(interval=1, requests=2, prompt_tokens=100, output_tokens=10))
    f.update(Traffic(interval=1, requests=20, prompt_tokens=100, output_tokens=10))
    assert f.predict().request_rate >= 20  # a step up is acted on at once
    f.update(Traffic(interval=1, requests=0))
    p = f.predict()
    assert 0 < p.request_rate < 20 and p.prompt_tokens == pytest.approx(100)  # lengths kept when idle


def test_forecaster_smooths_poisson_noise_at_a_low_rate() -> None:
    f = Forecaster()
    for n in [1, 0, 1, 1, 0, 1, 1, 0, 1, 1]:  # about 0.7 requests/s
        f.update(Traffic(interval=1, requests=n))
    f.update(Traffic(interval=1, requests=2))  # a common blip: 16% of seconds at this rate
    assert f.predict().request_rate < 1.5
    f.update(Traffic(interval=1, requests=6))  # not noise: a level shift
    assert f.predict().request_rate == pytest.approx(6)


def test_traffic_meter_rates_come_from_the_time_each_router_covered() -> None:
    m = TrafficMeter()
    # router a: 3 reports over 1.5 s (60 requests: 40/s); router b: 1 report over 0.5 s (5: 10/s)
    for n in (20, 20, 20):
        m.routed("a", 0.5, n, 100 * n, 10 * n)
    m.routed("b", 0.5, 5, 300 * 5, 30 * 5)
    m.prefill_job(64)
    # The planner's interval is 2 s, out of phase with the reports: the rates still hold (50/s).
    t = m.take(now=m._last + 2.0)
    assert t.request_rate == pytest.approx(50.0) and t.requests == 100
    assert t.prompt_tokens == pytest.approx((6000 + 1500) / 65) and t.output_tokens == pytest.approx(750 / 65)
    assert t.prefill_job_rate == pytest.approx(0.5)
    # Empty reports (a router gone idle) pull its rate down; no reports at all: no traffic.
    m.routed("a", 0.5, 10, 1000, 100)
    m.routed("a", 1.5, 0, 0, 0)
    assert m.take(now=m._last + 2.0).request_rate == pytest.approx(5.0)
    assert m.take().requests == 0
