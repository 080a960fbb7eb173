"""Many simulated decode workers in one process: fleet-scale tests and benchmarks on one box.

``baton decode --engine mocker --replicas 64`` runs 64 :class:`DecodeWorker` s, each a full worker
on the bus: its own id (``<base>-000`` ...), discovery registration, generate/cancel/status
subjects, load reports and KV events, each with its own mocker engine (own scheduler and KV pool).
What they share is the process and one NATS connection: a real fleet would hold one connection per
worker, so the server sees fewer clients here, but every subject, message and KV entry is the same.

Only the mocker is allowed: a real engine per replica would load the model N times for nothing.
The workers' Prometheus gauges are per-process (labelled by role), so the host's /metrics shows
the process, not each replica; per-worker load goes over the bus as usual.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace

import anyio

from services.decode.worker import DecodeSettings, DecodeWorker
from shared.bus import Bus
from shared.telemetry import serve_metrics

log = logging.getLogger("baton.decode.fleet")

MAX_REPLICAS = 4096


class DecodeFleet:
    """``replicas`` mocker decode workers sharing one process and one NATS connection."""

    role = "decode"

    def __init__(self, settings: DecodeSettings, replicas: int) -> None:
        if settings.engine.engine != "mocker":
            raise ValueError(f"--replicas > 1 needs --engine mocker (got {settings.engine.engine!r})")
        if not 1 <= replicas <= MAX_REPLICAS:
            raise ValueError(f"--replicas must be between 1 and {MAX_REPLICAS} (got {replicas})")
        self.settings = settings
        self.base_id = settings.worker_id or f"{self.role}-{uuid.uuid4().hex[:8]}"
        width = max(3, len(str(replicas - 1)))
        # One metrics endpoint for the process (below), none per replica.
        self.workers = [
            DecodeWorker(replace(settings, worker_id=f"{self.base_id}-{i:0{width}d}", metrics_port=0))
            for i in range(replicas)
        ]
        self.bus: Bus | None = None
        self._tg: anyio.abc.TaskGroup | None = None

    @property
    def ready(self) -> bool:
        return bool(self.workers) and all(w.ready for w in self.workers)

    async def run(self) -> None:
        self.bus = await Bus.connect(self.settings.nats_url, f"baton-{self.base_id}-fleet")
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                if self.settings.metrics_port:
                    tg.start_soon(serve_metrics, self.settings.metrics_port, lambda: self.ready)
                log.info("starting %d simulated decode workers (%s-*) on one NATS connection",
                         len(self.workers), self.base_id)
                for worker in self.workers:
                    worker.bus = self.bus  # DecodeWorker.run uses a bus set before it and leaves it open
                    tg.start_soon(worker.run)
        finally:
            await self.bus.close()

    async def drain(self) -> None:
        """Drain every replica at once (each deregisters, then finishes its requests)."""
        async with anyio.create_task_group() as tg:
            for worker in self.workers:
                tg.start_soon(worker.drain)
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
