"""Feeding the KV index from the KV-events JetStream stream, so every router replica agrees.

Workers publish :class:`KvEventBatch` on ``baton.v1.kv.events.<worker_id>``; the
``BATON_KV_EVENTS`` stream (limits retention) keeps them. A router ensures the stream exists,
loads the latest index snapshot (if any) from a JetStream object store, and reads the stream with
an ordered, ephemeral consumer from the message after the snapshot (or from the start). The live
feed and the replay are one and the same consumer, so a restarted router or a second replica
applies exactly the same batches in the same order and reaches the same index. It answers route
requests only once it has caught up with the stream as it was at start (bounded by a timeout).

Snapshots: every ``snapshot_interval`` seconds, if the index changed, a replica writes it with the
stream sequence it reflects. Any replica's snapshot will do: the index is a function of the stream.
Replay then costs the events since the last snapshot, not the stream's whole retention.

Lost events: a gap in a worker's sequence numbers (a failed publish, messages aged out of the
stream) drops that worker's blocks (the index may under-estimate it, never over-estimate) and
asks the worker to resync on ``baton.v1.kv.resync.<worker_id>``. A worker that supports it
answers with a ``cleared`` batch listing every block it caches, through the stream, so all
replicas converge again; one that does not is re-learned from its new events as its cache turns over.
"""

from __future__ import annotations

import logging
import time

import anyio
import anyio.lowlevel
from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge

from shared.bus import Bus
from shared.messages import kv_event_decoder
from shared.routing.kv_index import EventOutcome, encode_snapshot
from shared.routing.kv_policy import KvRouter
from shared.streams import StreamFollower, follow_kv_events, kv_events_last_seq, object_store
from shared.subjects import ROUTER_SNAPSHOT_BUCKET, kv_resync

log = logging.getLogger("baton.router.kv")

SNAPSHOT_BUCKET = ROUTER_SNAPSHOT_BUCKET
SNAPSHOT_OBJECT = "kv-index"


EVENT_BATCHES = Counter("baton_router_kv_event_batches_total", "KV event batches ingested, by outcome", ["outcome"])
BLOCK_EVENTS = Counter("baton_router_kv_block_events_total", "KV block events ingested", ["kind"])
RESYNCS = Counter("baton_router_kv_resync_requests_total", "Resyncs asked of workers after lost KV events")
STREAM_SEQ = Gauge("baton_router_kv_stream_seq", "Last KV-events stream sequence applied to the index")
SNAPSHOTS = Counter("baton_router_kv_snapshots_total", "Index snapshots", ["op"])

RESYNC_DEBOUNCE_S = 5.0


class KvEventFeed:
    def __init__(self, bus: Bus, router: KvRouter, snapshot_interval: float = 30.0,
                 catchup_timeout: float = 20.0) -> None:
        self.bus = bus
        self.router = router
        self.snapshot_interval = snapshot_interval
        self.catchup_timeout = catchup_timeout
        self.applied_stream_seq = 0
        self.resumed_from_snapshot = 0  # stream seq of the snapshot loaded at start (0: none)
        self._snapshot_seq = 0
        self._sub: StreamFollower | None = None
        self._caught_up_target = 0
        self._caught_up = anyio.Event()
        self._resync_asked: dict[str, float] = {}

    # --- start and catch up ----------------------------------------------------------------

    async def start(self) -> None:
        """Ensure the stream, load a snapshot, subscribe, and wait (bounded) until caught up."""
        last_seq = await kv_events_last_seq(self.bus)
        start_seq = await self._load_snapshot(last_seq) + 1
        self._caught_up_target = last_seq
        if self.applied_stream_seq >= last_seq:
            self._caught_up.set()
        self._sub = await follow_kv_events(self.bus, start_seq, self._on_msg)
        t0 = time.monotonic()
        with anyio.move_on_after(self.catchup_timeout):
            await self._caught_up.wait()
        if self._caught_up.is_set():
            log.info("KV index caught up to stream seq %d in %.2fs (from snapshot at %d): %s",
                     self.applied_stream_seq, time.monotonic() - t0, self.resumed_from_snapshot,
                     self.router.index.stats())
        else:
            log.warning("KV index replay not done after %.0fs (at %d of %d); routing with a partial index",
                        self.catchup_timeout, self.applied_stream_seq, last_seq)

    async def run(self) -> None:
        """Keep following the stream across NATS failovers, and write snapshots."""
        async with anyio.create_task_group() as tg:
            if self._sub is not None:
                tg.start_soon(self._sub.run)
            tg.start_soon(self.run_snapshots)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.stop()

    async def _on_msg(self, msg: Msg) -> None:
        try:
            seq = msg.metadata.sequence.stream
        except Exception:  # not a JetStream message: cannot place it in the stream's order
            return
        self.applied_stream_seq = seq
        STREAM_SEQ.set(seq)
        try:
            batch = kv_event_decoder.decode(msg.data)
        except Exception as e:
            EVENT_BATCHES.labels("undecodable").inc()
            log.warning("undecodable KV event at stream seq %d: %s", seq, e)
            return
        outcome = self.router.index.apply(batch)
        self.router.on_kv_events(batch, outcome)
        EVENT_BATCHES.labels(outcome.value).inc()
        if outcome is not EventOutcome.DUPLICATE:
            if batch.stored:
                BLOCK_EVENTS.labels("stored").inc(sum(len(r.block_hashes) for r in batch.stored))
            if batch.removed:
                BLOCK_EVENTS.labels("removed").inc(len(batch.removed))
        if outcome in (EventOutcome.GAP, EventOutcome.FIRST_GAP):
            log.info("KV events of %s: %s at seq %d; its blocks will be re-learned", batch.worker_id,
                     outcome.value, batch.seq)
        if not self._caught_up.is_set() and seq >= self._caught_up_target:
            self._caught_up.set()

    # --- resync ----------------------------------------------------------------------------

    async def request_resyncs(self, live_worker_ids: set[str]) -> None:
        """Ask live workers whose view was dropped to publish their full cache (debounced)."""
        pending = self.router.index.needs_resync
        if not pending:
            return
        now = time.monotonic()
        for worker_id in list(pending):
            if worker_id not in live_worker_ids:
                continue  # dead or not yet discovered: nobody to ask
            if now - self._resync_asked.get(worker_id, -1e9) < RESYNC_DEBOUNCE_S:
                continue
            self._resync_asked[worker_id] = now
            RESYNCS.inc()
            try:
                await self.bus.publish(kv_resync(worker_id), b"")
            except Exception as e:
                log.debug("resync request to %s failed: %r", worker_id, e)
        for worker_id in list(self._resync_asked):
            if worker_id not in pending:
                del self._resync_asked[worker_id]

    # --- snapshots -------------------------------------------------------------------------

    async def _object_store(self):
        return await object_store(self.bus, SNAPSHOT_BUCKET, "Baton router index snapshots")

    async def _load_snapshot(self, stream_last_seq: int) -> int:
        """Restore the latest snapshot; return the stream seq it reflects (0: none usable)."""
        try:
            store = await self._object_store()
            result = await store.get(SNAPSHOT_OBJECT)
        except Exception as e:  # no snapshot yet (or no object store): replay from the start
            log.info("no KV index snapshot (%s); replaying the KV events stream from the start", type(e).__name__)
            return 0
        data = result.data or b""
        try:
            snap = self.router.index.restore(data)
        except Exception as e:  # restore decodes before it changes anything: the index is still empty
            log.warning("unusable KV index snapshot (%r); replaying from the start", e)
            return 0
        if snap.stream_seq > stream_last_seq:
            # The stream is younger than the snapshot (recreated): the snapshot describes another history.
            log.warning("KV index snapshot at seq %d is ahead of the stream (%d); ignoring it", snap.stream_seq,
                        stream_last_seq)
            for worker_id in self.router.index.worker_ids:
                self.router.index.drop_worker(worker_id)
            return 0
        SNAPSHOTS.labels("loaded").inc()
        self.applied_stream_seq = self._snapshot_seq = self.resumed_from_snapshot = snap.stream_seq
        log.info("loaded KV index snapshot at stream seq %d (%d bytes, %d workers)", snap.stream_seq, len(data),
                 len(snap.workers))
        return snap.stream_seq

    async def save_snapshot(self) -> bool:
        """Write the index to the object store if it changed since the last snapshot.

        Built one worker at a time, yielding to the event loop in between, so routing never
        stalls for the whole index (see :meth:`KvBlockIndex.snapshot_parts` for why that is exact).
        """
        seq = self.applied_stream_seq
        if seq <= self._snapshot_seq:
            return False
        t0 = time.perf_counter()
        parts = []
        for part in self.router.index.snapshot_parts():
            parts.append(part)
            await anyio.lowlevel.checkpoint()
        data = encode_snapshot(seq, time.time(), parts)
        t1 = time.perf_counter()
        store = await self._object_store()
        await store.put(SNAPSHOT_OBJECT, data)
        self._snapshot_seq = seq
        SNAPSHOTS.labels("saved").inc()
        log.debug("KV index snapshot at seq %d: %d bytes, built in %.1f ms, stored in %.1f ms", seq, len(data),
                  (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3)
        return True

    async def run_snapshots(self) -> None:
        if self.snapshot_interval <= 0:
            return
        while True:
            await anyio.sleep(self.snapshot_interval)
            try:
                await self.save_snapshot()
            except Exception as e:  # NATS away or store full: try again next time
                log.warning("KV index snapshot failed: %r", e)
