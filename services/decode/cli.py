"""``baton decode`` / ``python -m services.decode``: a thin shell around :class:`DecodeWorker`."""

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
    max_inflight: Annotated[
        int, typer.Option(envvar="BATON_MAX_INFLIGHT", help="Requests held at once; beyond it, 503 at once.")
    ] = 1024,
    disagg: Annotated[
        bool, typer.Option("--disagg/--no-disagg", envvar="BATON_DISAGG",
                           help="Hand long prompts to prefill workers when that pays (see the next options).")
    ] = True,
    remote_prefill_min_tokens: Annotated[
        int, typer.Option(envvar="BATON_REMOTE_PREFILL_MIN_TOKENS",
                          help="Uncached prompt tokens from which prefill goes remote (run time: KV baton_config/disagg).")
    ] = 256,
    max_prefill_queue: Annotated[
        int, typer.Option(envvar="BATON_MAX_PREFILL_QUEUE", help="Prefill locally while this many jobs wait.")
    ] = 32,
    prefill_timeout: Annotated[
        float, typer.Option(envvar="BATON_PREFILL_TIMEOUT", help="Seconds before a remote prefill falls back to local.")
    ] = 30.0,
    kv_transport: KvTransportKind = "tcp",
    kv_host: KvHost = "127.0.0.1",
    kv_bind_host: KvBindHost = "",
    discovery_ttl: DiscoveryTtl = DEFAULT_TTL,
    metrics_port: MetricsPort = 0,
    log_level: LogLevel = "info",
    log_format: LogFormat = "text",
    drain_timeout: DrainTimeout = 30.0,
) -> None:
    """Run a decode worker: generate requests in, token chunks out."""
    from services.decode.disagg import DisaggSettings
    from services.decode.worker import DecodeSettings, DecodeWorker
    from shared.engines import EngineConfig
    from shared.preflight import check_engine, check_model, check_port, run_checks
    from shared.runtime import run_service

    run_checks("decode", [lambda: check_engine(engine), lambda: check_model(model),
                          lambda: check_port("0.0.0.0", metrics_port, "metrics", "--metrics-port")])

    settings = DecodeSettings(
        nats_url=nats_url,
        engine=EngineConfig(engine=engine, model=model, dtype=dtype, block_size=block_size, num_blocks=num_blocks,
                            max_num_seqs=max_num_seqs, max_batched_tokens=max_batched_tokens, speedup=mocker_speedup,
                            host_kv_blocks=host_kv_blocks, disk_kv_dir=disk_kv_dir, disk_kv_blocks=disk_kv_blocks,
                            kv_eviction=kv_eviction),
        worker_id=worker_id, served_model_name=served_model_name, discovery_ttl=discovery_ttl,
        max_inflight=max_inflight, metrics_port=metrics_port, kv_host=kv_host,
        kv_bind_host=kv_bind_host,
        disagg=DisaggSettings(enabled=disagg, min_tokens=remote_prefill_min_tokens, max_queue=max_prefill_queue,
                              prefill_timeout=prefill_timeout, transport=kv_transport),
    )
    run_service(DecodeWorker(settings), "decode", log_level, drain_timeout, log_format)


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command()(main)
