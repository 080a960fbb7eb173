"""JetStream streams and consumers, declared once and created idempotently by whoever needs them."""

from __future__ import annotations

from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from shared import subjects
from shared.bus import Bus

# A prefill job is worth nothing after a few minutes: its decode worker has long given up. The ack
# wait is well under the decode side's prefill timeout (30 s), so a job a dead prefill worker held is
# redelivered while its decode worker still waits; live workers send in_progress every third of it.
PREFILL_MAX_AGE_S = 600.0
PREFILL_ACK_WAIT_S = 10.0


def prefill_stream_config() -> StreamConfig:
    return StreamConfig(
        name=subjects.PREFILL_STREAM,
        subjects=[subjects.PREFILL_JOBS],
        retention=RetentionPolicy.WORK_QUEUE,  # each job goes to one consumer and is gone once acked
        storage=StorageType.FILE,  # acknowledged jobs survive a NATS restart
        max_age=PREFILL_MAX_AGE_S,
        max_msgs=100_000,
        discard=DiscardPolicy.NEW,  # a full queue refuses new jobs (back-pressure) rather than drop old ones
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


def kv_events_stream_config() -> StreamConfig:
    return StreamConfig(
        name=subjects.KV_EVENTS_STREAM,
        subjects=[subjects.KV_EVENTS_ALL],
        retention=RetentionPolicy.LIMITS,  # kept for replay by a restarted router
        storage=StorageType.FILE,
        max_age=3600.0,
        max_bytes=1 << 30,
        discard=DiscardPolicy.OLD,
    )


async def ensure_prefill_queue(bus: Bus) -> None:
    await bus.ensure_stream(prefill_stream_config())
    try:
        await bus.js.add_consumer(subjects.PREFILL_STREAM, prefill_consumer_config())
    except Exception:  # exists already (same durable): fine
        pass
