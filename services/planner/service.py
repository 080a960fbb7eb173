"""The planner actor: watches the queue, the workers' load and the traffic; scales prefill and decode.

Every interval it reads the prefill consumer's pending and in-flight counts from JetStream, the
latest LoadReport of every registered worker and the new requests and prefill jobs seen (the
routers' TrafficReports on ``baton.v1.traffic``; the prefill jobs subject, beside the workers), and publishes a
PlannerObservation. A policy (load thresholds or SLA targets) proposes replicas per role; the
stabilizer damps proposals (N intervals in a row, cooldowns, min/max); each decision is published
on ``baton.v1.planner.decisions`` as a ScaleDecision, logged with its reason, counted in metrics,
and (unless ``dry_run``) carried out by the connector.

Several models: each model is a :class:`ModelPool` with its own policy state, stabilizer, min/max
(``--model-limits name=min:max``), traffic meter and connector (the local one starts workers of
that model). Signals are read per model (its workers, its load reports, the requests naming it);
decisions carry the model. The prefill queue is one stream for every model, so its depth is seen
by every pool. One pool with model ``""`` (the default) counts every worker, as before.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import anyio
from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge

from services.planner.connectors import Connector, NullConnector
from services.planner.forecast import TrafficMeter
from services.planner.policy import Damping, HoldPolicy, Policy, Stabilizer
from services.planner.signals import ROLES, Proposal, Role, RoleSignals, Signals
from shared import subjects
from shared.bus import Bus
from shared.cli_options import DEFAULT_NATS_URL
from shared.discovery import DEFAULT_TTL, WorkerView
from shared.messages import (
    LoadReport,
    PlannerObservation,
    ScaleDecision,
    WorkerInfo,
    load_report_decoder,
    prefill_job_decoder,
    traffic_report_decoder,
)
from shared.streams import ensure_prefill_queue, prefill_queue_depth
from shared.telemetry import serve_metrics

log = logging.getLogger("baton.planner")

PREFILL_PENDING = Gauge("baton_planner_prefill_queue_pending", "Prefill jobs waiting in the queue")
PREFILL_INFLIGHT = Gauge("baton_planner_prefill_queue_inflight", "Prefill jobs delivered, not yet acked")
WORKERS = Gauge("baton_planner_workers", "Registered workers", ["role", "model"])
KV_USAGE = Gauge("baton_planner_decode_kv_usage", "Mean KV usage over decode workers")
DECODE_WAITING = Gauge("baton_planner_decode_waiting", "Requests waiting in decode workers")
REPLICAS = Gauge("baton_planner_replicas", "Replicas the planner wants", ["role", "model"])
PROPOSED = Gauge("baton_planner_proposed_replicas", "Replicas the policy proposed this interval", ["role", "model"])
DECISIONS = Counter("baton_planner_decisions_total", "Scaling decisions",
                    ["role", "direction", "policy", "dry_run", "model"])
REQUEST_RATE = Gauge("baton_planner_request_rate", "New requests per second seen last interval")
ACT_FAILURES = Counter("baton_planner_connector_failures_total", "Decisions the connector failed to carry out",
                       ["role", "model"])


@dataclass
class PlannerSettings:
    nats_url: str = DEFAULT_NATS_URL
    interval: float = 2.0
    discovery_ttl: float = DEFAULT_TTL
    metrics_port: int = 0
    limits: dict[str, tuple[int, int]] = field(default_factory=lambda: {"decode": (1, 8), "prefill": (0, 8)})
    initial: dict[str, int] | None = None  # fleet to start with (connectors that own workers); None: limits' min
    damping: Damping = field(default_factory=Damping)
    dry_run: bool = False  # decide and report, never act
    connector_timeout: float = 120.0
    # Several models: decode min/max per model (models not named here get ``limits``' decode range).
    model_limits: dict[str, tuple[int, int]] = field(default_factory=dict)

    def limits_for(self, model: str) -> dict[str, tuple[int, int]]:
        return {**self.limits, "decode": self.model_limits.get(model, self.limits["decode"])}


def parse_model_limits(items: list[str]) -> dict[str, tuple[int, int]]:
    """``name=min:max`` items -> ``{name: (min, max)}`` (ValueError names the bad one)."""
    out: dict[str, tuple[int, int]] = {}
    for item in items:
        name, sep, rng = item.partition("=")
        lo, sep2, hi = rng.partition(":")
        try:
            limits = (int(lo), int(hi))
        except ValueError:
            limits = (-1, -1)
        if not sep or not sep2 or not name.strip() or not 0 <= limits[0] <= limits[1]:
            raise ValueError(f"model limits {item!r}: expected name=min:max with 0 <= min <= max")
        out[name.strip()] = limits
    return out


@dataclass
class ModelPool:
    """What the planner keeps per model: policy state, damping, connector, traffic and targets."""

    model: str  # "": every worker (one-model deployments)
    policy: Policy
    connector: Connector
    stabilizer: Stabilizer
    limits: dict[str, tuple[int, int]]
    meter: TrafficMeter = field(default_factory=TrafficMeter)
    targets: dict[Role, int] | None = None  # replicas per role as the planner believes them
    last: PlannerObservation | None = None


class Planner:
    def __init__(self, settings: PlannerSettings, policy: Policy | None = None,
                 connector: Connector | None = None, pools: list[ModelPool] | None = None) -> None:
        self.settings = settings
        if pools is None:
            pools = [ModelPool("", policy or HoldPolicy(), connector or NullConnector(),
                               Stabilizer(settings.limits, settings.damping), dict(settings.limits))]  # type: ignore[arg-type]
        if len({p.model for p in pools}) != len(pools):
            raise ValueError("one pool per model")
        self.pools = pools
        self.bus: Bus | None = None
        self.view: WorkerView | None = None
        self.loads: dict[str, LoadReport] = {}
        self.last: PlannerObservation | None = None
        self.decisions: list[ScaleDecision] = []
        self._stop = anyio.Event()

    # One-model shorthands (the first pool): what single-model callers and tests read.
    @property
    def policy(self) -> Policy:
        return self.pools[0].policy

    @property
    def connector(self) -> Connector:
        return self.pools[0].connector

    @property
    def stabilizer(self) -> Stabilizer:
        return self.pools[0].stabilizer

    @property
    def meter(self) -> TrafficMeter:
        return self.pools[0].meter

    @property
    def targets(self) -> dict[Role, int] | None:
        return self.pools[0].targets

    @targets.setter
    def targets(self, value: dict[Role, int] | None) -> None:
        self.pools[0].targets = value

    def acting_for(self, pool: ModelPool) -> bool:
        return not self.settings.dry_run and not isinstance(pool.connector, NullConnector)

    @property
    def acting(self) -> bool:
        return self.acting_for(self.pools[0])

    def initial(self, pool: ModelPool | None = None) -> dict[Role, int]:
        pool = pool or self.pools[0]
        init = self.settings.initial or {}
        return {r: pool.stabilizer.clamp(r, init.get(r, pool.limits[r][0])) for r in ROLES}

    async def run(self) -> None:
        self.bus = await Bus.connect(self.settings.nats_url, "baton-planner")
        try:
            await ensure_prefill_queue(self.bus)
            self.view = WorkerView(self.bus, self.settings.discovery_ttl)
            # The initial fleet is the deployment, not a decision: started even in dry-run.
            for pool in self.pools:
                known = await pool.connector.start(self.initial(pool))
                if all(known.get(r) is not None for r in ROLES):
                    pool.targets = {r: int(known[r] or 0) for r in ROLES}
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.view.run)
                if self.settings.metrics_port:
                    tg.start_soon(serve_metrics, self.settings.metrics_port, lambda: self.last is not None)
                await self.bus.subscribe(subjects.LOAD_ALL, self._on_load)
                # The traffic: what the routers placed (reports, twice a second per busy router) and,
                # beside the prefill workers (no queue group), every prefill job.
                await self.bus.subscribe(subjects.TRAFFIC, self._on_traffic)
                await self.bus.subscribe(subjects.PREFILL_JOBS, self._on_prefill_job)
                tg.start_soon(self._loop)
                await self._stop.wait()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                for pool in self.pools:
                    try:
                        await pool.connector.close()
                    except Exception as e:
                        log.warning("connector close failed: %r", e)
                await self.bus.close()

    async def drain(self) -> None:
        self._stop.set()
        await anyio.sleep_forever()

    # --- inputs ----------------------------------------------------------------------------

    async def _on_load(self, msg: Msg) -> None:
        try:
            report = load_report_decoder.decode(msg.data)
        except Exception:
            return
        self.loads[report.worker_id] = report

    async def _on_traffic(self, msg: Msg) -> None:
        try:
            report = traffic_report_decoder.decode(msg.data)
        except Exception:
            return
        if not report.interval > 0:
            return
        share = {id(pool): [0, 0, 0] for pool in self.pools}
        for t in report.models:
            pool = self._pool_of(t.model)
            if pool is not None:
                c = share[id(pool)]
                c[0] += t.requests
                c[1] += t.prompt_tokens
                c[2] += t.output_tokens
        for pool in self.pools:  # every pool hears the report (the time it covers counts), with its share
            pool.meter.routed(report.source, report.interval, *share[id(pool)])

    async def _on_prefill_job(self, msg: Msg) -> None:
        try:
            job = prefill_job_decoder.decode(msg.data)
        except Exception:
            return
        for pool in self.pools:  # jobs do not name their model: one queue for all (see the module docstring)
            pool.meter.prefill_job(len(job.token_ids))

    def _pool_of(self, model: str) -> ModelPool | None:
        for pool in self.pools:
            if pool.model in ("", model):
                return pool
        return None

    async def observe(self, pool: ModelPool | None = None) -> tuple[PlannerObservation, Signals]:
        assert self.bus is not None and self.view is not None
        pool = pool or self.pools[0]
        pending = ack_pending = 0
        try:
            pending, ack_pending = await prefill_queue_depth(self.bus, timeout=3)
        except Exception as e:
            log.debug("consumer info unavailable: %r", e)
        live = {w.worker_id for w in self.view.workers()}
        self.loads = {k: v for k, v in self.loads.items() if k in live}  # forget workers that left
        decode = self.view.workers("decode", pool.model)
        prefill = self.view.workers("prefill", pool.model)
        reports = [self.loads[w.worker_id] for w in decode if w.worker_id in self.loads]
        usage = [r.kv_blocks_used / r.kv_blocks_total for r in reports if r.kv_blocks_total]
        now = time.time()
        d = RoleSignals(
            ready=len(decode), running=sum(r.running for r in reports), waiting=sum(r.waiting for r in reports),
            kv_usage=sum(usage) / len(usage) if usage else 0.0,
            prefill_tokens_queued=sum(r.prefill_tokens_queued for r in reports),
        )
        p = RoleSignals(ready=len(prefill), queue_pending=pending, queue_inflight=ack_pending)
        signals = Signals(timestamp=now, decode=d, prefill=p, traffic=pool.meter.take())
        obs = PlannerObservation(
            timestamp=now, model=pool.model, prefill_pending=pending, prefill_ack_pending=ack_pending,
            prefill_workers=len(prefill), decode_workers=len(decode),
            decode_running=d.running, decode_waiting=d.waiting, kv_usage=d.kv_usage,
        )
        PREFILL_PENDING.set(pending)
        PREFILL_INFLIGHT.set(ack_pending)
        WORKERS.labels("decode", pool.model).set(len(decode))
        WORKERS.labels("prefill", pool.model).set(len(prefill))
        KV_USAGE.set(obs.kv_usage)
        DECODE_WAITING.set(d.waiting)
        REQUEST_RATE.set(signals.traffic.request_rate)
        self.last = pool.last = obs
        return obs, signals

    # --- deciding --------------------------------------------------------------------------

    def victims(self, role: Role, model: str = "") -> list[WorkerInfo]:
        """Registered workers of ``role`` (and ``model``), the one to stop first (least work in hand) first."""
        assert self.view is not None
        workers = self.view.workers(role, model)

        def load(w: WorkerInfo) -> tuple[int, float]:
            r = self.loads.get(w.worker_id)
            return (r.running + r.waiting, r.kv_blocks_used) if r else (0, 0.0)

        return sorted(workers, key=lambda w: (*load(w), -w.started_at))

    async def step(self, signals: Signals, now: float | None = None,
                   pool: ModelPool | None = None) -> list[ScaleDecision]:
        """One decision round for one model: propose, damp, publish, act. Returns the decisions made."""
        pool = pool or self.pools[0]
        now = time.monotonic() if now is None else now
        if pool.targets is None:  # the fleet size is not known from the connector: take what discovery shows
            pool.targets = {r: signals.role(r).ready for r in ROLES}
        if not self.acting_for(pool):
            # Nothing acts on our decisions: judge the fleet that really runs, not the one we wished for.
            # (Clamped: a fleet still registering is no reason to report a limits decision each interval.)
            pool.targets = {r: pool.stabilizer.clamp(r, signals.role(r).ready) for r in ROLES}
        current = dict(pool.targets)
        proposals: dict[Role, Proposal] = pool.policy.propose(signals, current)
        made: list[ScaleDecision] = []
        for role in ROLES:
            prop = proposals[role]
            PROPOSED.labels(role, pool.model).set(prop.replicas)
            change = pool.stabilizer.decide(prop, current[role], signals.role(role).ready, now)
            if change is None:
                continue
            decision = ScaleDecision(timestamp=time.time(), role=role, before=change.before, after=change.after,
                                     reason=change.reason, dry_run=not self.acting_for(pool), model=pool.model)
            made.append(decision)
            await self._apply(decision, pool)
        for role in ROLES:
            REPLICAS.labels(role, pool.model).set(pool.targets[role])
        return made

    async def _apply(self, d: ScaleDecision, pool: ModelPool) -> None:
        assert pool.targets is not None
        direction = "up" if d.after > d.before else "down"
        DECISIONS.labels(d.role, direction, pool.policy.name, str(d.dry_run).lower(), pool.model).inc()
        log.info("%sscale %s%s %s: %d -> %d (%s)", "[dry-run] " if d.dry_run else "", d.role,
                 f" of {pool.model}" if pool.model else "", direction, d.before, d.after, d.reason)
        self.decisions.append(d)
        del self.decisions[:-1000]
        if self.bus is not None:
            try:
                await self.bus.publish(subjects.PLANNER_DECISIONS, d)
            except Exception as e:
                log.warning("decision publish failed: %r", e)
        pool.targets[d.role] = d.after
        if d.dry_run:
            return
        try:
            with anyio.fail_after(self.settings.connector_timeout):
                await pool.connector.scale(d.role, d.after, self.victims(d.role, pool.model) if self.view else [])
        except Exception as e:
            ACT_FAILURES.labels(d.role, pool.model).inc()
            log.error("%s could not scale %s to %d: %s", pool.connector.name, d.role, d.after, e)
            pool.targets[d.role] = d.before

    async def _loop(self) -> None:
        assert self.bus is not None and self.view is not None
        with anyio.move_on_after(max(2.0, self.settings.discovery_ttl)):
            await self.view.synced.wait()  # a half-read fleet would look like a scale-up is due
        for pool in self.pools:
            pool.meter.take()  # start the first traffic sample now
        while True:
            started = anyio.current_time()
            for pool in self.pools:
                obs, signals = await self.observe(pool)
                try:
                    await self.bus.publish(subjects.PLANNER_OBSERVATIONS, obs)
                except Exception as e:
                    log.debug("publish failed: %r", e)
                try:
                    await self.step(signals, pool=pool)
                except Exception:
                    log.exception("planning step for %s failed", pool.model or "the fleet")
                try:
                    await pool.connector.reconcile()
                except Exception:
                    log.exception("connector upkeep failed")
                log.debug("observed %s", obs)
            await anyio.sleep(max(0.0, self.settings.interval - (anyio.current_time() - started)))
