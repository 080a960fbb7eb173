"""``baton decode`` / ``python -m services.decode``: a thin shell around :class:`DecodeWorker`."""

from __future__ import annotations

from typing import Annotated

import typer

from shared.builtin_model import DEFAULT_MODEL
from shared.config import (
    DEFAULT_NATS_URL,
    BlockSize,
    DiscoveryTtl,
    Engine,
    LogLevel,
    MaxBatchedTokens,
    MaxNumSeqs,
    MetricsPort,
    MockerSpeedup,
    Model,
    NatsUrl,
    NumBlocks,
    ServedModelName,
    WorkerId,
)
from shared.discovery import DEFAULT_TTL


def main(
    nats_url: NatsUrl = DEFAULT_NATS_URL,
    model: Model = DEFAULT_MODEL,
    served_model_name: ServedModelName = None,
    engine: Engine = "torch",
    block_size: BlockSize = 16,
    num_blocks: NumBlocks = 0,
    max_num_seqs: MaxNumSeqs = 64,
    max_batched_tokens: MaxBatchedTokens = 512,
    mocker_speedup: MockerSpeedup = 1.0,
    worker_id: WorkerId = None,
    max_inflight: Annotated[
        int, typer.Option(envvar="BATON_MAX_INFLIGHT", help="Requests held at once; beyond it, 503 at once.")
    ] = 1024,
    discovery_ttl: DiscoveryTtl = DEFAULT_TTL,
    metrics_port: MetricsPort = 0,
    log_level: LogLevel = "info",
) -> None:
    """Run a decode worker: generate requests in, token chunks out."""
    from services.decode.worker import DecodeSettings, DecodeWorker
    from shared.engines import EngineConfig
    from shared.runtime import run_service

    settings = DecodeSettings(
        nats_url=nats_url,
        engine=EngineConfig(engine=engine, model=model, block_size=block_size, num_blocks=num_blocks,
                            max_num_seqs=max_num_seqs, max_batched_tokens=max_batched_tokens, speedup=mocker_speedup),
        worker_id=worker_id, served_model_name=served_model_name, discovery_ttl=discovery_ttl,
        max_inflight=max_inflight, metrics_port=metrics_port,
    )
    run_service(DecodeWorker(settings), "decode", log_level)


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command()(main)
