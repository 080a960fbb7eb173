"""JetStream streams, consumers, KV and object buckets: declared once, created idempotently, and the
only place (with :mod:`shared.bus`) that touches raw JetStream. Services call these helpers.

Every stream and bucket is created with the bus's replica count (``--js-replicas`` /
``BATON_JS_REPLICAS``, :attr:`Bus.js_replicas`). One that already exists with fewer replicas is
reported once, by name, with how to fix it: it is not silently reused as if it were replicated.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from shared import subjects
from shared.bus import Bus

log = logging.getLogger("baton.bus")

# A prefill job is worth nothing after a few minutes: its decode worker has long given up. The ack
# wait is well under the decode side's prefill timeout (30 s), so a job a dead prefill worker held is
# redelivered while its decode worker still waits; live workers send in_progress every third of it.
PREFILL_MAX_AGE_S = 600.0
PREFILL_ACK_WAIT_S = 10.0
JS_TIMEOUT_S = 5.0  # any one JetStream API call (create, info, publish ack)


def prefill_stream_config(replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        name=subjects.PREFILL_STREAM,
        subjects=[subjects.PREFILL_JOBS],
        retention=RetentionPolicy.WORK_QUEUE,  # each job goes to one consumer and is gone once acked
        storage=StorageType.FILE,  # acknowledged jobs survive a NATS restart
        max_age=PREFILL_MAX_AGE_S,
        max_msgs=100_000,
        discard=DiscardPolicy.NEW,  # a full queue refuses new jobs (back-pressure) rather than drop old ones
        num_replicas=replicas,
    )


def prefill_consumer_config() -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=subjects.PREFILL_CONSUMER,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=PREFILL_ACK_WAIT_S,  # a worker that dies mid-job: redelivered after this
        max_deliver=5,
        deliver_policy=DeliverPolicy.ALL,
        max_ack_pending=1024,
        filter_subject=subjects.PREFILL_JOBS,
    )


def kv_events_stream_config(replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        name=subjects.KV_EVENTS_STREAM,
        subjects=[subjects.KV_EVENTS_ALL],
        retention=RetentionPolicy.LIMITS,  # kept for replay by a restarted router
        storage=StorageType.FILE,
        max_age=3600.0,
        max_bytes=1 << 30,
        discard=DiscardPolicy.OLD,
        num_replicas=replicas,
    )


# --- replicas ---------------------------------------------------------------------------------

_reported: set[str] = set()


def check_replicas(bus: Bus, what: str, stream_name: str, have: int | None, fix: str) -> bool:
    """Warn once per stream when it has fewer replicas than ``bus.js_replicas``; True if enough."""
    have = have or 1
    if have >= bus.js_replicas:
        return True
    if stream_name not in _reported:
        _reported.add(stream_name)
        log.warning("JetStream %s exists with %d replica(s) but --js-replicas/BATON_JS_REPLICAS asks for %d: "
                    "it is NOT replicated as asked; fix: %s", what, have, bus.js_replicas, fix)
    return False


async def _stream_replicas(bus: Bus, stream_name: str) -> int | None:
    with anyio.fail_after(JS_TIMEOUT_S):
        info = await bus.js.stream_info(stream_name)
    return info.config.num_replicas


async def ensure_stream(bus: Bus, config: StreamConfig) -> None:
    """Create ``config``'s stream with the bus's replica count, or update the existing one (which
    raises its replicas where the cluster allows it); report it if it stays under-replicated."""
    config.num_replicas = bus.js_replicas
    with anyio.fail_after(JS_TIMEOUT_S * 2):
        await bus.ensure_stream(config)
    assert config.name is not None
    check_replicas(bus, f"stream {config.name}", config.name, await _stream_replicas(bus, config.name),
                   f"`nats stream edit {config.name} --replicas {bus.js_replicas}`, or delete the stream "
                   "and let Baton recreate it")


async def key_value_bucket(bus: Bus, config: KeyValueConfig) -> KeyValue:
    """Open KV bucket ``config.bucket``, creating it (with the bus's replicas) if absent. Idempotent
    and safe against a concurrent creator; an existing under-replicated bucket is reported."""
    name = config.bucket
    config.replicas = bus.js_replicas
    with anyio.fail_after(JS_TIMEOUT_S * 2):
        try:
            kv = await bus.js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            try:
                return await bus.js.create_key_value(config)
            except nats.js.errors.BadRequestError:  # created concurrently by another service
                return await bus.js.key_value(name)
        stream = f"KV_{name}"
        check_replicas(bus, f"KV bucket {name}", stream, await _stream_replicas(bus, stream),
                       f"`nats kv del {name}` while Baton is stopped (it is recreated with "
                       f"{bus.js_replicas} replicas), or `nats stream edit {stream} --replicas {bus.js_replicas}`")
    return kv


async def object_store(bus: Bus, bucket: str, description: str = "") -> ObjectStore:
    """Open object bucket ``bucket``, creating it (with the bus's replicas) if absent."""
    with anyio.fail_after(JS_TIMEOUT_S * 2):
        try:
            store = await bus.js.object_store(bucket)
        except nats.js.errors.BucketNotFoundError:
            config = ObjectStoreConfig(storage=StorageType.FILE, description=description, replicas=bus.js_replicas)
            try:
                return await bus.js.create_object_store(bucket, config)
            except nats.js.errors.BadRequestError:  # created concurrently by another replica
                return await bus.js.object_store(bucket)
        stream = f"OBJ_{bucket}"
        check_replicas(bus, f"object bucket {bucket}", stream, await _stream_replicas(bus, stream),
                       f"`nats object del {bucket}` while Baton is stopped, or "
                       f"`nats stream edit {stream} --replicas {bus.js_replicas}`")
    return store


async def _watch_consumer_info(watcher: object) -> Any:
    """The server's info on a KV watch's (ordered, ephemeral) consumer, asked within 2 s; None if
    the watcher has no subscription to ask about. Raises if the server cannot answer."""
    sub = getattr(watcher, "_sub", None)  # nats-py's KeyWatcher keeps its JetStream subscription here
    if sub is None:
        return None
    with anyio.fail_after(2):
        return await sub.consumer_info()


async def watch_alive(watcher: object) -> bool:
    """Does a KV watch's (ordered, ephemeral) consumer still exist? It lives on one server: with
    that server gone, nats-py's watcher just goes quiet."""
    try:
        await _watch_consumer_info(watcher)
        return True
    except Exception:
        return False


async def initial_entry_count(watcher: object) -> int | None:
    """How many entries a KV watch's consumer has to deliver for its initial values to be all in:
    those the server has delivered plus those still pending, asked when nats-py's "initial values
    done" marker (None) arrives. nats-py can send that marker early: it reads the consumer's
    pending count as 0 while delivered entries are still on their way to the client. A watcher
    that must see the whole initial set counts entries up to this. None if the server cannot say."""
    try:
        info = await _watch_consumer_info(watcher)
    except Exception:
        return None
    if info is None:
        return None
    return int(info.delivered.consumer_seq or 0) + int(info.num_pending or 0)


async def watch_key(bus: Bus, bucket: KeyValueConfig, key: str, on_value: Callable[[bytes], None]) -> None:
    """Call ``on_value`` with each value of ``key`` (the current one first), forever; re-watch
    after a lost consumer or a reconnect (the watch's consumer may not survive a server change)."""
    while True:
        try:
            kv = await key_value_bucket(bus, bucket)
            seen_reconnects = bus.reconnects
            with anyio.fail_after(JS_TIMEOUT_S * 2):
                watcher = await kv.watch(key)
            try:
                while bus.reconnects == seen_reconnects:
                    try:
                        entry = await watcher.updates(timeout=2)
                    except nats.errors.TimeoutError:
                        if not await watch_alive(watcher):
                            break  # lost with a server of the cluster: watch anew
                        continue
                    if entry is not None and entry.value:
                        on_value(entry.value)
            finally:
                with anyio.move_on_after(2, shield=True):
                    try:
                        await watcher.stop()
                    except Exception:  # the connection is already gone
                        pass
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as e:
            log.debug("watch of %s/%s failed (%r); retrying", bucket.bucket, key, e)
            await anyio.sleep(1)


def config_bucket() -> KeyValueConfig:
    """The run-time switches bucket (``baton_config``)."""
    return KeyValueConfig(bucket=subjects.CONFIG_BUCKET, history=1, storage=StorageType.FILE)


# --- the prefill work queue ---------------------------------------------------------------------

async def ensure_prefill_queue(bus: Bus) -> None:
    await ensure_stream(bus, prefill_stream_config())
    try:
        with anyio.fail_after(JS_TIMEOUT_S):
            await bus.js.add_consumer(subjects.PREFILL_STREAM, prefill_consumer_config())
    except Exception as e:  # exists already (same durable): fine
        log.debug("prefill consumer not added: %r", e)


async def prefill_queue_depth(bus: Bus, timeout: float = 2.0) -> tuple[int, int]:
    """(jobs waiting, jobs handed out but not yet acknowledged) of the prefill work queue."""
    with anyio.fail_after(timeout):
        info = await bus.js.consumer_info(subjects.PREFILL_STREAM, subjects.PREFILL_CONSUMER)
    return info.num_pending or 0, info.num_ack_pending or 0


async def publish_prefill_job(bus: Bus, payload: bytes, headers: dict[str, str] | None = None,
                              timeout: float = JS_TIMEOUT_S) -> None:
    """Enqueue one job; returns once JetStream acknowledged it (stored on a quorum of replicas)."""
    with anyio.fail_after(timeout):
        await bus.js.publish(subjects.PREFILL_JOBS, payload, headers=headers, timeout=timeout)


class PrefillJobs:
    """The prefill workers' pull subscription on the shared durable consumer."""

    def __init__(self, sub: Any) -> None:
        self._sub = sub

    @classmethod
    async def subscribe(cls, bus: Bus) -> PrefillJobs:
        with anyio.fail_after(JS_TIMEOUT_S * 2):
            sub = await bus.js.pull_subscribe(subjects.PREFILL_JOBS, durable=subjects.PREFILL_CONSUMER,
                                              stream=subjects.PREFILL_STREAM)
        return cls(sub)

    async def fetch(self, batch: int, timeout: float = 1.0) -> list[Msg]:
        """Up to ``batch`` jobs; [] if none came within ``timeout``. Other errors (NATS away) raise."""
        try:
            with anyio.fail_after(timeout + 2):
                return await self._sub.fetch(batch=batch, timeout=timeout)
        except (nats.errors.TimeoutError, TimeoutError):
            return []


# --- the KV events stream -------------------------------------------------------------------------

async def kv_events_last_seq(bus: Bus) -> int:
    """Ensure the KV events stream exists; its last sequence number."""
    await ensure_stream(bus, kv_events_stream_config())
    with anyio.fail_after(JS_TIMEOUT_S):
        info = await bus.js.stream_info(subjects.KV_EVENTS_STREAM)
    return info.state.last_seq


class StreamFollower:
    """Reads a stream in order, from a start sequence, with an ordered (ephemeral) consumer, and
    keeps doing so across failovers.

    An ordered consumer lives on one server (the stream leader's): when that server dies, or the
    client reconnects elsewhere, the consumer is gone, and nats-py's own recovery waits for missed
    heartbeats and gives up for good if its one retry fails mid-election. :meth:`run` checks every
    ``check_interval`` s that the consumer still answers and re-creates it from the next sequence
    not yet seen; messages seen twice (an overlap of old and new consumer) are dropped.
    """

    def __init__(self, bus: Bus, subject: str, stream: str, cb: Callable[[Msg], Awaitable[None]],
                 check_interval: float = 1.0) -> None:
        self.bus = bus
        self.subject = subject
        self.stream = stream
        self._cb = cb
        self.check_interval = check_interval
        self.last_seq = 0  # stream sequence of the last message handed to cb
        self.resubscribes = 0
        self._sub: Any = None

    async def _on_msg(self, msg: Msg) -> None:
        try:
            seq = msg.metadata.sequence.stream
        except Exception:  # not a JetStream message
            return
        if seq <= self.last_seq:
            return  # already handed over (a re-created consumer overlapping the old one)
        self.last_seq = seq
        await self._cb(msg)

    async def start(self, start_seq: int) -> None:
        """Subscribe from ``start_seq`` (1: from the start)."""
        self.last_seq = max(0, start_seq - 1)
        await self._subscribe()

    async def _subscribe(self) -> None:
        start = self.last_seq + 1
        config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        if start > 1:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start)
        with anyio.fail_after(JS_TIMEOUT_S * 2):
            self._sub = await self.bus.js.subscribe(self.subject, stream=self.stream, cb=self._on_msg,
                                                    ordered_consumer=True, config=config)

    async def _drop(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with anyio.move_on_after(2, shield=True):
                try:
                    await sub.unsubscribe()
                except Exception as e:  # the connection it was on is gone
                    log.debug("unsubscribe of the %s consumer failed: %r", self.stream, e)

    async def _consumer_alive(self) -> bool:
        try:
            with anyio.fail_after(min(2.0, self.check_interval * 2)):
                await self._sub.consumer_info()
            return True
        except Exception:
            return False

    async def run(self) -> None:
        """Keep the consumer alive until cancelled."""
        seen_reconnects = self.bus.reconnects
        while True:
            await anyio.sleep(self.check_interval)
            if not self.bus.connected:
                continue  # nothing to check against until the client is back
            if self._sub is not None and self.bus.reconnects == seen_reconnects and await self._consumer_alive():
                continue
            seen_reconnects = self.bus.reconnects
            await self._drop()
            try:
                await self._subscribe()
                self.resubscribes += 1
                log.info("following %s again from sequence %d", self.stream, self.last_seq + 1)
            except Exception as e:  # mid-election: try again next round
                log.info("cannot follow %s yet (%r); retrying", self.stream, e)

    async def stop(self) -> None:
        await self._drop()


async def follow_kv_events(bus: Bus, start_seq: int, cb: Callable[[Msg], Awaitable[None]]) -> StreamFollower:
    """Follow the KV events stream from ``start_seq``; run the returned follower's ``run()``."""
    follower = StreamFollower(bus, subjects.KV_EVENTS_ALL, subjects.KV_EVENTS_STREAM, cb)
    await follower.start(start_seq)
    return follower
