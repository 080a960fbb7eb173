"""Every NATS subject, stream, consumer and bucket name Baton uses, in one place.

Versioned under ``baton.v1`` so a future wire change can run beside this one.
Worker ids are single subject tokens (``decode-3f2a9c1b``): no dots, spaces or wildcards.
"""

from __future__ import annotations

PREFIX = "baton.v1"

# Router: request/reply, queue group so replicas share the load.
ROUTE = f"{PREFIX}.route"
ROUTER_QUEUE = "baton-router"

# Public NATS request API: any NATS client may send an ApiGenerateRequest (msgpack or JSON)
# here with a reply inbox and receive ApiChunk messages until one has a finish_reason.
API_GENERATE = f"{PREFIX}.api.generate"
API_QUEUE = "baton-api"

# Public NATS API for LoRA adapters: a LoraLoad / LoraUnload (msgpack or JSON) with a reply inbox,
# answered with one LoraReply once every worker of the base model answered (or timed out).
API_LORA = f"{PREFIX}.api.lora"

# Prefill work queue (JetStream, work-queue retention: each job is delivered to one worker).
PREFILL_STREAM = "BATON_PREFILL"
PREFILL_JOBS = f"{PREFIX}.prefill.jobs"
PREFILL_CONSUMER = "prefill-workers"

# KV events (JetStream, limits retention, so a router can replay after a restart).
KV_EVENTS_STREAM = "BATON_KV_EVENTS"
KV_EVENTS_ALL = f"{PREFIX}.kv.events.*"

LOAD_ALL = f"{PREFIX}.load.*"
# Routers' TrafficReports (new requests placed, per model, every half second while busy): the planner's meter.
TRAFFIC = f"{PREFIX}.traffic"
PLANNER_OBSERVATIONS = f"{PREFIX}.planner.observations"
PLANNER_DECISIONS = f"{PREFIX}.planner.decisions"

# Discovery: one key per worker, refreshed; the bucket's TTL expires dead workers.
WORKERS_BUCKET = "baton_workers"
# Runtime switches (KV bucket): the decode workers watch its "disagg" key.
CONFIG_BUCKET = "baton_config"

# A router that lost a worker's KV events asks it (empty message) to resend its whole cache.
KV_RESYNC = f"{PREFIX}.kv.resync"
# Router index snapshots (JetStream object store), so a new replica need not replay everything.
ROUTER_SNAPSHOT_BUCKET = "baton_router_snapshots"
# Tokenizer and chat-template files workers publish for frontends that cannot read their model path.
MODEL_FILES_BUCKET = "baton_model_files"


def generate(worker_id: str) -> str:
    """Where a worker takes GenerateRequests; chunks go to the message's reply inbox."""
    return f"{PREFIX}.generate.{worker_id}"


def cancel(worker_id: str) -> str:
    """Fire-and-forget Cancel messages for requests running on ``worker_id``."""
    return f"{PREFIX}.cancel.{worker_id}"


def status(worker_id: str) -> str:
    """Request/reply liveness probe of one worker (StatusRequest -> StatusReply)."""
    return f"{PREFIX}.status.{worker_id}"


def lora(worker_id: str) -> str:
    """Request/reply: load or unload a LoRA adapter on this worker (LoraCommand -> LoraReply)."""
    return f"{PREFIX}.lora.{worker_id}"


def prefill_done(request_id: str) -> str:
    """Prefill worker -> decode worker notice for one request."""
    return f"{PREFIX}.prefill.done.{request_id}"


def kv_events(worker_id: str) -> str:
    return f"{PREFIX}.kv.events.{worker_id}"


def kv_resync(worker_id: str) -> str:
    return f"{KV_RESYNC}.{worker_id}"


def kv_fetch(worker_id: str) -> str:
    """Request/reply: pull KV blocks from this worker's host/disk tiers (G4)."""
    return f"{PREFIX}.kv.fetch.{worker_id}"


def load(worker_id: str) -> str:
    return f"{PREFIX}.load.{worker_id}"


def worker_key(role: str, worker_id: str) -> str:
    """Discovery key: ``<role>.<worker_id>`` so watchers can filter by role."""
    return f"{role}.{worker_id}"
