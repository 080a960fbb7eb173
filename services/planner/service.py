"""The planner actor: watches the prefill queue and the workers' load, and says what it sees.

Every interval it reads the prefill consumer's pending and in-flight counts from JetStream, the
latest LoadReport of every registered worker, and publishes a PlannerObservation. Turning
observations into scaling decisions (policies, connectors) is the planner issue's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import anyio
from nats.aio.msg import Msg
from prometheus_client import Gauge

from shared import subjects
from shared.bus import Bus
from shared.config import DEFAULT_NATS_URL
from shared.discovery import DEFAULT_TTL, WorkerView
from shared.messages import LoadReport, PlannerObservation, load_report_decoder
from shared.streams import ensure_prefill_queue
from shared.telemetry import serve_metrics

log = logging.getLogger("baton.planner")

PREFILL_PENDING = Gauge("baton_planner_prefill_queue_pending", "Prefill jobs waiting in the queue")
PREFILL_INFLIGHT = Gauge("baton_planner_prefill_queue_inflight", "Prefill jobs delivered, not yet acked")
WORKERS = Gauge("baton_planner_workers", "Registered workers", ["role"])
KV_USAGE = Gauge("baton_planner_decode_kv_usage", "Mean KV usage over decode workers")


@dataclass
class PlannerSettings:
    nats_url: str = DEFAULT_NATS_URL
    interval: float = 2.0
    discovery_ttl: float = DEFAULT_TTL
    metrics_port: int = 0


class Planner:
    def __init__(self, settings: PlannerSettings) -> None:
        self.settings = settings
        self.bus: Bus | None = None
        self.view: WorkerView | None = None
        self.loads: dict[str, LoadReport] = {}
        self.last: PlannerObservation | None = None
        self._stop = anyio.Event()

    async def run(self) -> None:
        self.bus = await Bus.connect(self.settings.nats_url, "baton-planner")
        try:
            await ensure_prefill_queue(self.bus)
            self.view = WorkerView(self.bus, self.settings.discovery_ttl)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.view.run)
                if self.settings.metrics_port:
                    tg.start_soon(serve_metrics, self.settings.metrics_port, lambda: self.last is not None)
                await self.bus.subscribe(subjects.LOAD_ALL, self._on_load)
                tg.start_soon(self._observe_loop)
                await self._stop.wait()
                tg.cancel_scope.cancel()
        finally:
            await self.bus.close()

    async def drain(self) -> None:
        self._stop.set()
        await anyio.sleep_forever()

    async def _on_load(self, msg: Msg) -> None:
        try:
            report = load_report_decoder.decode(msg.data)
        except Exception:
            return
        self.loads[report.worker_id] = report

    async def observe(self) -> PlannerObservation:
        assert self.bus is not None and self.view is not None
        pending = ack_pending = 0
        try:
            with anyio.fail_after(3):
                info = await self.bus.js.consumer_info(subjects.PREFILL_STREAM, subjects.PREFILL_CONSUMER)
            pending, ack_pending = info.num_pending or 0, info.num_ack_pending or 0
        except Exception as e:
            log.debug("consumer info unavailable: %r", e)
        decode = self.view.workers("decode")
        prefill = self.view.workers("prefill")
        live = {w.worker_id for w in decode}
        # Forget reports of workers that left discovery.
        self.loads = {k: v for k, v in self.loads.items() if k in live or k in {w.worker_id for w in prefill}}
        reports = [self.loads[w] for w in live if w in self.loads]
        usage = [r.kv_blocks_used / r.kv_blocks_total for r in reports if r.kv_blocks_total]
        obs = PlannerObservation(
            timestamp=time.time(), prefill_pending=pending, prefill_ack_pending=ack_pending,
            prefill_workers=len(prefill), decode_workers=len(decode),
            decode_running=sum(r.running for r in reports), decode_waiting=sum(r.waiting for r in reports),
            kv_usage=sum(usage) / len(usage) if usage else 0.0,
        )
        PREFILL_PENDING.set(pending)
        PREFILL_INFLIGHT.set(ack_pending)
        WORKERS.labels("decode").set(len(decode))
        WORKERS.labels("prefill").set(len(prefill))
        KV_USAGE.set(obs.kv_usage)
        self.last = obs
        return obs

    async def _observe_loop(self) -> None:
        assert self.bus is not None
        while True:
            obs = await self.observe()
            try:
                await self.bus.publish(subjects.PLANNER_OBSERVATIONS, obs)
            except Exception as e:
                log.debug("publish failed: %r", e)
            log.debug("observed %s", obs)
            await anyio.sleep(self.settings.interval)
