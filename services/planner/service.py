"""The planner actor: watches the queue, the workers' load and the traffic; scales prefill and decode.

Every interval it reads the prefill consumer's pending and in-flight counts from JetStream, the
latest LoadReport of every registered worker and the new requests and prefill jobs it saw (it
listens on ``generate.*`` and the prefill jobs subject beside the workers), and publishes a
PlannerObservation. A policy (load thresholds or SLA targets) proposes replicas per role; the
stabilizer damps proposals (N intervals in a row, cooldowns, min/max); each decision is published
on ``baton.v1.planner.decisions`` as a ScaleDecision, logged with its reason, counted in metrics,
and (unless ``dry_run``) carried out by the connector.
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
    generate_request_decoder,
    load_report_decoder,
    prefill_job_decoder,
)
from shared.streams import ensure_prefill_queue, prefill_queue_depth
from shared.telemetry import serve_metrics

log = logging.getLogger("baton.planner")

PREFILL_PENDING = Gauge("baton_planner_prefill_queue_pending", "Prefill jobs waiting in the queue")
PREFILL_INFLIGHT = Gauge("baton_planner_prefill_queue_inflight", "Prefill jobs delivered, not yet acked")
WORKERS = Gauge("baton_planner_workers", "Registered workers", ["role"])
KV_USAGE = Gauge("baton_planner_decode_kv_usage", "Mean KV usage over decode workers")
DECODE_WAITING = Gauge("baton_planner_decode_waiting", "Requests waiting in decode workers")
REPLICAS = Gauge("baton_planner_replicas", "Replicas the planner wants", ["role"])
PROPOSED = Gauge("baton_planner_proposed_replicas", "Replicas the policy proposed this interval", ["role"])
DECISIONS = Counter("baton_planner_decisions_total", "Scaling decisions", ["role", "direction", "policy", "dry_run"])
REQUEST_RATE = Gauge("baton_planner_request_rate", "New requests per second seen last interval")
ACT_FAILURES = Counter("baton_planner_connector_failures_total", "Decisions the connector failed to carry out",
                       ["role"])


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


class Planner:
    def __init__(self, settings: PlannerSettings, policy: Policy | None = None,
                 connector: Connector | None = None) -> None:
        self.settings = settings
        self.policy: Policy = policy or HoldPolicy()
        self.connector: Connector = connector or NullConnector()
        self.stabilizer = Stabilizer(settings.limits, settings.damping)  # type: ignore[arg-type]
        self.bus: Bus | None = None
        self.view: WorkerView | None = None
        self.loads: dict[str, LoadReport] = {}
        self.meter = TrafficMeter()
        self.last: PlannerObservation | None = None
        self.targets: dict[Role, int] | None = None  # replicas per role as the planner believes them
        self.decisions: list[ScaleDecision] = []
        self._stop = anyio.Event()

    @property
    def acting(self) -> bool:
        return not self.settings.dry_run and not isinstance(self.connector, NullConnector)

    def initial(self) -> dict[Role, int]:
        init = self.settings.initial or {}
        return {r: self.stabilizer.clamp(r, init.get(r, self.settings.limits[r][0])) for r in ROLES}

    async def run(self) -> None:
        self.bus = await Bus.connect(self.settings.nats_url, "baton-planner")
        try:
            await ensure_prefill_queue(self.bus)
            self.view = WorkerView(self.bus, self.settings.discovery_ttl)
            # The initial fleet is the deployment, not a decision: started even in dry-run.
            known = await self.connector.start(self.initial())
            if all(known.get(r) is not None for r in ROLES):
                self.targets = {r: int(known[r] or 0) for r in ROLES}
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.view.run)
                if self.settings.metrics_port:
                    tg.start_soon(serve_metrics, self.settings.metrics_port, lambda: self.last is not None)
                await self.bus.subscribe(subjects.LOAD_ALL, self._on_load)
                # Beside the workers (no queue group): every request and prefill job, to measure the traffic.
                await self.bus.subscribe(subjects.generate("*"), self._on_generate)
                await self.bus.subscribe(subjects.PREFILL_JOBS, self._on_prefill_job)
                tg.start_soon(self._loop)
                await self._stop.wait()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await self.connector.close()
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

    async def _on_generate(self, msg: Msg) -> None:
        try:
            req = generate_request_decoder.decode(msg.data)
        except Exception:
            return
        self.meter.request(req.request_id, len(req.token_ids), req.sampling.max_tokens)

    async def _on_prefill_job(self, msg: Msg) -> None:
        try:
            job = prefill_job_decoder.decode(msg.data)
        except Exception:
            return
        self.meter.prefill_job(len(job.token_ids))

    async def observe(self) -> tuple[PlannerObservation, Signals]:
        assert self.bus is not None and self.view is not None
        pending = ack_pending = 0
        try:
            pending, ack_pending = await prefill_queue_depth(self.bus, timeout=3)
        except Exception as e:
            log.debug("consumer info unavailable: %r", e)
        decode = self.view.workers("decode")
        prefill = self.view.workers("prefill")
        live = {w.worker_id for w in decode} | {w.worker_id for w in prefill}
        self.loads = {k: v for k, v in self.loads.items() if k in live}  # forget workers that left
        reports = [self.loads[w.worker_id] for w in decode if w.worker_id in self.loads]
        usage = [r.kv_blocks_used / r.kv_blocks_total for r in reports if r.kv_blocks_total]
        now = time.time()
        d = RoleSignals(
            ready=len(decode), running=sum(r.running for r in reports), waiting=sum(r.waiting for r in reports),
            kv_usage=sum(usage) / len(usage) if usage else 0.0,
            prefill_tokens_queued=sum(r.prefill_tokens_queued for r in reports),
        )
        p = RoleSignals(ready=len(prefill), queue_pending=pending, queue_inflight=ack_pending)
        signals = Signals(timestamp=now, decode=d, prefill=p, traffic=self.meter.take())
        obs = PlannerObservation(
            timestamp=now, prefill_pending=pending, prefill_ack_pending=ack_pending,
            prefill_workers=len(prefill), decode_workers=len(decode),
            decode_running=d.running, decode_waiting=d.waiting, kv_usage=d.kv_usage,
        )
        PREFILL_PENDING.set(pending)
        PREFILL_INFLIGHT.set(ack_pending)
        WORKERS.labels("decode").set(len(decode))
        WORKERS.labels("prefill").set(len(prefill))
        KV_USAGE.set(obs.kv_usage)
        DECODE_WAITING.set(d.waiting)
        REQUEST_RATE.set(signals.traffic.request_rate)
        self.last = obs
        return obs, signals

    # --- deciding --------------------------------------------------------------------------

    def victims(self, role: Role) -> list[WorkerInfo]:
        """Registered workers of ``role``, the one to stop first (least work in hand) first."""
        assert self.view is not None
        workers = self.view.workers(role)

        def load(w: WorkerInfo) -> tuple[int, float]:
            r = self.loads.get(w.worker_id)
            return (r.running + r.waiting, r.kv_blocks_used) if r else (0, 0.0)

        return sorted(workers, key=lambda w: (*load(w), -w.started_at))

    async def step(self, signals: Signals, now: float | None = None) -> list[ScaleDecision]:
        """One decision round: propose, damp, publish, act. Returns the decisions made."""
        now = time.monotonic() if now is None else now
        if self.targets is None:  # the fleet size is not known from the connector: take what discovery shows
            self.targets = {r: signals.role(r).ready for r in ROLES}
        if not self.acting:
            # Nothing acts on our decisions: judge the fleet that really runs, not the one we wished for.
            # (Clamped: a fleet still registering is no reason to report a limits decision each interval.)
            self.targets = {r: self.stabilizer.clamp(r, signals.role(r).ready) for r in ROLES}
        current = dict(self.targets)
        proposals: dict[Role, Proposal] = self.policy.propose(signals, current)
        made: list[ScaleDecision] = []
        for role in ROLES:
            prop = proposals[role]
            PROPOSED.labels(role).set(prop.replicas)
            change = self.stabilizer.decide(prop, current[role], signals.role(role).ready, now)
            if change is None:
                continue
            decision = ScaleDecision(timestamp=time.time(), role=role, before=change.before, after=change.after,
                                     reason=change.reason, dry_run=not self.acting)
            made.append(decision)
            await self._apply(decision)
        for role in ROLES:
            REPLICAS.labels(role).set(self.targets[role])
        return made

    async def _apply(self, d: ScaleDecision) -> None:
        assert self.targets is not None
        direction = "up" if d.after > d.before else "down"
        DECISIONS.labels(d.role, direction, self.policy.name, str(d.dry_run).lower()).inc()
        log.info("%sscale %s %s: %d -> %d (%s)", "[dry-run] " if d.dry_run else "", d.role, direction,
                 d.before, d.after, d.reason)
        self.decisions.append(d)
        del self.decisions[:-1000]
        if self.bus is not None:
            try:
                await self.bus.publish(subjects.PLANNER_DECISIONS, d)
            except Exception as e:
                log.warning("decision publish failed: %r", e)
        self.targets[d.role] = d.after
        if d.dry_run:
            return
        try:
            with anyio.fail_after(self.settings.connector_timeout):
                await self.connector.scale(d.role, d.after, self.victims(d.role) if self.view else [])
        except Exception as e:
            ACT_FAILURES.labels(d.role).inc()
            log.error("%s could not scale %s to %d: %s", self.connector.name, d.role, d.after, e)
            self.targets[d.role] = d.before

    async def _loop(self) -> None:
        assert self.bus is not None and self.view is not None
        with anyio.move_on_after(max(2.0, self.settings.discovery_ttl)):
            await self.view.synced.wait()  # a half-read fleet would look like a scale-up is due
        self.meter.take()  # start the first traffic sample now
        while True:
            started = anyio.current_time()
            obs, signals = await self.observe()
            try:
                await self.bus.publish(subjects.PLANNER_OBSERVATIONS, obs)
            except Exception as e:
                log.debug("publish failed: %r", e)
            try:
                await self.step(signals)
            except Exception:
                log.exception("planning step failed")
            try:
                await self.connector.reconcile()
            except Exception:
                log.exception("connector upkeep failed")
            log.debug("observed %s", obs)
            await anyio.sleep(max(0.0, self.settings.interval - (anyio.current_time() - started)))
