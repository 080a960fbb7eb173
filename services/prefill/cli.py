"""``baton prefill`` / ``python -m services.prefill``: a thin shell around :class:`PrefillWorker`."""

from __future__ import annotations

from typing import Annotated

import typer

from shared.builtin_model import DEFAULT_MODEL
from shared.config import (
    DEFAULT_NATS_URL,
    BlockSize,
    DiscoveryTtl,
    DiskKvBlocks,
    DiskKvDir,
    DrainTimeout,
    Dtype,
    Engine,
    HostKvBlocks,
    JsReplicas,
    KvBindHost,
    KvEviction,
    KvHost,
    KvTransportKind,
    LogFormat,
    LogLevel,
    MaxBatchedTokens,
    MaxNumSeqs,
    MetricsPort,
    MockerSpeedup,
    Model,
    NatsCreds,
    NatsUrl,
    NumBlocks,
    ServedModelName,
    WorkerId,
)
from shared.discovery import DEFAULT_TTL


def main(
    nats_url: NatsUrl = DEFAULT_NATS_URL,
    nats_creds: NatsCreds = None,
    js_replicas: JsReplicas = None,
    model: Model = DEFAULT_MODEL,
    served_model_name: ServedModelName = None,
    engine: Engine = "torch",
    dtype: Dtype = "auto",
    block_size: BlockSize = 16,
    num_blocks: NumBlocks = 0,
    max_num_seqs: MaxNumSeqs = 64,
    max_batched_tokens: MaxBatchedTokens = 512,
    mocker_speedup: MockerSpeedup = 1.0,
    host_kv_blocks: HostKvBlocks = 0,
    disk_kv_dir: DiskKvDir = "",
    disk_kv_blocks: DiskKvBlocks = 0,
    kv_eviction: KvEviction = "lru",
    worker_id: WorkerId = None,
    max_concurrent_jobs: Annotated[
        int, typer.Option(envvar="BATON_MAX_CONCURRENT_JOBS", help="Prefill jobs computed at once.")
    ] = 8,
    kv_transport: KvTransportKind = "tcp",
    kv_host: KvHost = "127.0.0.1",
    kv_bind_host: KvBindHost = "",
    discovery_ttl: DiscoveryTtl = DEFAULT_TTL,
    metrics_port: MetricsPort = 0,
    log_level: LogLevel = "info",
    log_format: LogFormat = "text",
    drain_timeout: DrainTimeout = 30.0,
) -> None:
    """Run a prefill worker: pull prefill jobs from the JetStream work queue."""
    from services.prefill.worker import PrefillSettings, PrefillWorker
    from shared.engines import EngineConfig
    from shared.preflight import check_engine, check_model, check_port, run_checks
    from shared.runtime import run_service

    run_checks("prefill", [lambda: check_engine(engine), lambda: check_model(model),
                          lambda: check_port("0.0.0.0", metrics_port, "metrics", "--metrics-port")])

    settings = PrefillSettings(
        nats_url=nats_url,
        engine=EngineConfig(engine=engine, model=model, dtype=dtype, block_size=block_size, num_blocks=num_blocks,
                            max_num_seqs=max_num_seqs, max_batched_tokens=max_batched_tokens, speedup=mocker_speedup,
                            host_kv_blocks=host_kv_blocks, disk_kv_dir=disk_kv_dir, disk_kv_blocks=disk_kv_blocks,
                            kv_eviction=kv_eviction),
        worker_id=worker_id, served_model_name=served_model_name, discovery_ttl=discovery_ttl,
        max_concurrent_jobs=max_concurrent_jobs, metrics_port=metrics_port, transport=kv_transport,
        kv_host=kv_host, kv_bind_host=kv_bind_host,
    )
    run_service(PrefillWorker(settings), "prefill", log_level, drain_timeout, log_format)


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command()(main)
