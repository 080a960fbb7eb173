"""The skeleton every engine worker (decode, prefill) stands on.

A :class:`WorkerHost` owns what a worker does whatever its role: the engine built from one
:class:`EngineConfig`, the bus connection, the metrics server, the KV transport, the discovery
registration, the periodic load reports and KV events, and the drain. A role subclass adds only
its own work: :meth:`serve` (subscribe, start its tasks) and, for a worker that pulls its work
(prefill), :meth:`work`. Its in-flight count (``begin``/``end``) is what a drain waits on.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import ClassVar

import anyio
import anyio.abc
from prometheus_client import Gauge

from shared import subjects
from shared.bus import Bus
from shared.cli_options import DEFAULT_NATS_URL
from shared.discovery import DEFAULT_TTL, WorkerRegistration
from shared.engines import Engine, EngineConfig, make_engine
from shared.kv_address import advertised_host, bind_host_for
from shared.kv_transport import KvTls, KvTransport, make_transport
from shared.messages import KvEventBatch, LoadReport, LoraInfo, WorkerInfo
from shared.model_files import advertise_model
from shared.runtime import settle_heap
from shared.telemetry import serve_metrics

log = logging.getLogger("baton.worker")

KV_USED = Gauge("baton_worker_kv_blocks_used", "KV blocks in use", ["role"])
KV_TOTAL = Gauge("baton_worker_kv_blocks_total", "KV blocks in the pool", ["role"])
KV_USAGE = Gauge("baton_worker_kv_cache_usage_ratio", "Share of KV blocks in use", ["role"])
WAITING = Gauge("baton_worker_requests_waiting", "Requests queued in the engine", ["role"])
ENGINE_RUNNING = Gauge("baton_worker_engine_requests_running", "Requests in the engine's running batch", ["role"])
PREEMPTIONS = Gauge("baton_worker_preemptions", "Preemptions since start (KV pool ran out)", ["role"])
PROMPT_TOKENS = Gauge("baton_worker_prompt_tokens", "Prompt tokens admitted since start", ["role"])
LORA_LOADS = Gauge("baton_worker_lora_loads", "LoRA adapters made resident since start (reloads included)",
                   ["role"])
LORA_EVICTIONS = Gauge("baton_worker_lora_evictions", "Resident LoRA adapters evicted to make room", ["role"])
PREFIX_HIT_TOKENS = Gauge("baton_worker_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache",
                          ["role"])


@dataclass
class WorkerSettings:
    """What every worker is told: where the bus is, the engine (whole), how it is seen and reached."""

    nats_url: str = DEFAULT_NATS_URL
    engine: EngineConfig = field(default_factory=EngineConfig)
    worker_id: str | None = None
    served_model_name: str | None = None
    discovery_ttl: float = DEFAULT_TTL
    metrics_port: int = 0
    kv_transport: str = "tcp"  # tcp | ucx
    kv_host: str = "127.0.0.1"  # address peers use to reach our KV transport (advertised)
    kv_bind_host: str = ""  # address the KV transport listens on ("": see shared/kv_address.py)
    load_interval: float = 1.0  # a LoadReport at least this often
    load_min_interval: float = 0.05  # and one this soon after the load changes
    kv_event_interval: float = 0.05


class WorkerHost:
    """Run one engine as a worker of ``role``; subclasses fill in :meth:`serve` / :meth:`work`."""

    role: ClassVar[str]
    publishes_load: ClassVar[bool] = True  # load reports and KV events for the routers and planner

    def __init__(self, settings: WorkerSettings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.worker_id = settings.worker_id or f"{self.role}-{uuid.uuid4().hex[:8]}"
        self.engine = engine or make_engine(settings.engine)
        self.bus: Bus | None = None
        self.registration: WorkerRegistration | None = None
        self.transport: KvTransport | None = None
        self.ready = False
        self._tg: anyio.abc.TaskGroup | None = None
        self._draining = False
        self._in_flight = 0
        self._idle = anyio.Event()  # set when draining and the last piece of work is done
        self._kv_seq = 0
        self._started_at = time.time()
        self._load_figures: tuple[int, ...] | None = None  # what the last LoadReport said, and when
        self._load_sent_at = 0.0
        self.model_fields: dict[str, object] = {}  # context length, digests, path (shared/model_files.py)

    # --- what a role fills in ------------------------------------------------------------

    def wants_transport(self) -> bool:
        """Whether this worker needs a KV transport once its engine is ready."""
        return False

    def info_fields(self) -> dict[str, str]:
        """This role's own WorkerInfo fields (the subjects and KV endpoint it is reached on)."""
        return {}

    async def prepare(self) -> None:
        """Bus-side set-up before anything starts (e.g. make sure a stream exists)."""

    async def serve(self, tg: anyio.abc.TaskGroup) -> None:
        """Subscribe and start this role's tasks in ``tg`` (before registration)."""

    async def work(self) -> None:
        """A worker that pulls its work runs its loop here (after registration); returning stops the worker.
        By default: serve until cancelled (work arrives through the subscriptions)."""
        await anyio.sleep_forever()

    # --- the skeleton ----------------------------------------------------------------------

    @property
    def model(self) -> str:
        return self.settings.served_model_name or self.engine.model_name or self.settings.engine.model

    @property
    def draining(self) -> bool:
        return self._draining

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            worker_id=self.worker_id, role=self.role, model=self.model,  # type: ignore[arg-type]
            block_size=self.engine.block_size, engine=self.engine.name, pid=os.getpid(), host=socket.gethostname(),
            started_at=self._started_at, loras=[LoraInfo(name=n, digest=d) for n, d in self.engine.loras()],
            **self.model_fields, **self.info_fields(),  # type: ignore[arg-type]
        )

    async def advertise(self) -> None:
        """Publish this worker's WorkerInfo again now (its adapters changed), not at the next refresh."""
        if self.registration is not None:
            await self.registration.update(self.info())

    async def run(self) -> None:
        # A bus set before run() belongs to a host of many workers (services/decode/fleet.py): use it, leave it open.
        owns_bus = self.bus is None
        if self.bus is None:
            self.bus = await Bus.connect(self.settings.nats_url, f"baton-{self.worker_id}")
        try:
            await self.prepare()
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self.engine.run)
                if self.settings.metrics_port:
                    tg.start_soon(serve_metrics, self.settings.metrics_port, lambda: self.ready)
                await self.engine.wait_ready()
                if self.wants_transport():
                    await self._start_transport(tg)
                await self.serve(tg)
                # What frontends need to serve the model; decode workers (the ones frontends send
                # requests to) also publish the tokenizer files once.
                self.model_fields = await advertise_model(
                    self.bus, self.settings.engine.model,
                    getattr(self.engine, "max_model_len", None) or self.settings.engine.max_model_len,
                    publish=self.role == "decode")
                self.registration = WorkerRegistration(self.bus, self.info(), self.settings.discovery_ttl)
                await self.registration.register()
                tg.start_soon(self.registration.run)
                if self.publishes_load:
                    tg.start_soon(self._report_load)
                    tg.start_soon(self._publish_kv_events)
                self.ready = True
                if owns_bus:  # (a fleet of workers in one process settles once, at its start)
                    settle_heap()  # the engine, its pools and connections stay out of the collector's way
                log.info("%s serving %s with the %s engine", self.worker_id, self.model, self.engine.name)
                await self.work()
                tg.cancel_scope.cancel()
        finally:
            self.ready = False
            if owns_bus:
                await self.bus.close()

    async def _start_transport(self, tg: anyio.abc.TaskGroup) -> None:
        s = self.settings
        self.transport = make_transport(s.kv_transport, advertised_host(s.kv_host),
                                        bind_host_for(s.kv_host, s.kv_bind_host), KvTls.from_env())
        await self.transport.start()
        log.info("KV transport %s at %s", self.transport.name, self.transport.endpoint)
        tg.start_soon(self.transport.run)

    # --- in-flight work and the drain -------------------------------------------------------

    def begin(self) -> None:
        self._in_flight += 1

    def end(self) -> None:
        self._in_flight -= 1
        if self._draining and not self._in_flight:
            self._idle.set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def drain(self) -> None:
        """Deregister so no new work arrives, let in-flight work finish, then stop."""
        self._draining = True
        if self.registration is not None:
            await self.registration.withdraw()
        if self._in_flight:
            await self._idle.wait()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    # --- periodic reports ----------------------------------------------------------------

    async def _report_load(self) -> None:
        """A LoadReport soon after the load changes (checked every ``load_min_interval`` and right
        after each KV event batch; at most one per ``load_min_interval``), and at least every
        ``load_interval``.

        Routers count what they sent a worker as pending until a report shows it; a report only
        once a second left a finished request counted as busy for up to that long, enough to send
        a repeated prefix away from the worker that has it cached.
        """
        while True:
            await self._publish_load()
            await anyio.sleep(min(self.settings.load_min_interval, self.settings.load_interval))

    async def _publish_load(self) -> None:
        """Publish a LoadReport if the figures changed since the last one or it is time for one."""
        assert self.bus is not None
        # Batches up to this seq were drained before now, so the figures taken next reflect
        # every request whose prompt blocks they announced (routers rely on that; see kv_seq).
        kv_seq = self._kv_seq
        st = self.engine.stats()
        loras = self.engine.loras_resident()
        figures = (st.kv_blocks_used, st.kv_blocks_total, st.running, st.waiting, st.prefill_tokens_queued, kv_seq,
                   tuple(loras))
        now = time.monotonic()
        since = now - self._load_sent_at
        # At most one report per load_min_interval (a busy worker's figures change every step).
        if since < self.settings.load_interval and (figures == self._load_figures
                                                    or since < self.settings.load_min_interval):
            return
        self._load_figures, self._load_sent_at = figures, now
        role = self.role
        KV_USED.labels(role).set(st.kv_blocks_used)
        KV_TOTAL.labels(role).set(st.kv_blocks_total)
        KV_USAGE.labels(role).set(st.kv_blocks_used / st.kv_blocks_total if st.kv_blocks_total else 0.0)
        WAITING.labels(role).set(st.waiting)
        ENGINE_RUNNING.labels(role).set(st.running)
        PREEMPTIONS.labels(role).set(st.preemptions)
        PROMPT_TOKENS.labels(role).set(st.prompt_tokens)
        PREFIX_HIT_TOKENS.labels(role).set(st.prefix_hit_tokens)
        LORA_LOADS.labels(role).set(st.lora_loads)
        LORA_EVICTIONS.labels(role).set(st.lora_evictions)
        if self.engine.kv_tiers is not None:
            self.engine.kv_tiers.update_gauges()
        report = LoadReport(
            worker_id=self.worker_id, role=role, timestamp=time.time(),  # type: ignore[arg-type]
            kv_blocks_used=st.kv_blocks_used, kv_blocks_total=st.kv_blocks_total, running=st.running,
            waiting=st.waiting, prefill_tokens_queued=st.prefill_tokens_queued, kv_seq=kv_seq,
            loras_resident=loras,
        )
        try:
            await self.bus.publish(subjects.load(self.worker_id), report)
        except Exception as e:
            log.debug("load report failed: %r", e)

    async def _publish_kv_events(self) -> None:
        """Every interval, one batch per tier that changed: device (1), host (2), disk (3)."""
        assert self.bus is not None
        subject = subjects.kv_events(self.worker_id)
        while True:
            await anyio.sleep(self.settings.kv_event_interval)
            published = False
            for tier, buffer in ((1, self.engine.kv_events), *self.engine.tier_events.items()):
                stored, removed, cleared = buffer.drain()
                if not (stored or removed or cleared):
                    continue
                self._kv_seq += 1
                published = True
                batch = KvEventBatch(worker_id=self.worker_id, seq=self._kv_seq, stored=stored, removed=removed,
                                     cleared=cleared, tier=tier)
                try:
                    await self.bus.publish(subject, batch)
                except Exception as e:
                    log.debug("kv event publish failed: %r", e)
            if published:  # a report that shows the requests these batches announced, without delay
                await self._publish_load()
