"""Configuration shared by every service: CLI options that also read ``BATON_*`` variables.

Each service's Typer CLI declares its options with these helpers, so ``--nats-url`` and
``BATON_NATS_URL`` mean the same thing everywhere.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"

NatsUrl = Annotated[
    str, typer.Option("--nats-url", envvar="BATON_NATS_URL", help="NATS server URL (JetStream enabled).")
]


def _export_creds(path: str | None) -> str | None:
    # The bus reads credentials from the environment (shared.bus.NatsSecurity.from_env), so the
    # option and the variable mean the same thing; the path, never the secret, is what travels.
    if path:
        os.environ["BATON_NATS_CREDS"] = path
    return path


NatsCreds = Annotated[
    str | None,
    typer.Option("--nats-creds", envvar="BATON_NATS_CREDS", callback=_export_creds,
                 help="NATS credentials file of this service's role (written by `baton up` / "
                      "`baton auth init`; a NATS .creds JWT file works too)."),
]
LogLevel = Annotated[
    str, typer.Option("--log-level", envvar="BATON_LOG_LEVEL", help="debug, info, warning or error.")
]
MetricsPort = Annotated[
    int,
    typer.Option(
        "--metrics-port", envvar="BATON_METRICS_PORT", help="Serve /metrics and /health on this port (0: off)."
    ),
]
Model = Annotated[
    str,
    typer.Option(
        "--model",
        envvar="BATON_MODEL",
        help="Built-in model name (baton-tiny, baton-small) or a Hugging Face model directory.",
    ),
]
ServedModelName = Annotated[
    str | None,
    typer.Option("--served-model-name", envvar="BATON_SERVED_MODEL_NAME", help="Name clients use in 'model'."),
]
DiscoveryTtl = Annotated[
    float,
    typer.Option(
        "--discovery-ttl", envvar="BATON_DISCOVERY_TTL", help="Seconds after which a silent worker is gone."
    ),
]

# --- engine options, shared by the decode and prefill worker CLIs -------------------------
Engine = Annotated[str, typer.Option("--engine", envvar="BATON_ENGINE", help="torch, mocker or vllm.")]
BlockSize = Annotated[int, typer.Option("--block-size", envvar="BATON_BLOCK_SIZE", help="Tokens per KV block.")]
NumBlocks = Annotated[
    int, typer.Option("--num-blocks", envvar="BATON_NUM_BLOCKS", help="KV pool size in blocks (0: engine default).")
]
MaxNumSeqs = Annotated[
    int, typer.Option("--max-num-seqs", envvar="BATON_MAX_NUM_SEQS", help="Most sequences in the running batch.")
]
MaxBatchedTokens = Annotated[
    int,
    typer.Option("--max-batched-tokens", envvar="BATON_MAX_BATCHED_TOKENS", help="Token budget per engine step."),
]
MockerSpeedup = Annotated[
    float,
    typer.Option("--mocker-speedup", envvar="BATON_MOCKER_SPEEDUP", help="Mocker: divide simulated costs by this."),
]
WorkerId = Annotated[
    str | None, typer.Option("--worker-id", envvar="BATON_WORKER_ID", help="Worker id (default: role + random hex).")
]
HostKvBlocks = Annotated[
    int, typer.Option("--host-kv-blocks", envvar="BATON_HOST_KV_BLOCKS",
                      help="KV blocks to keep in host memory when evicted from the engine's pool (0: off).")
]
DiskKvDir = Annotated[
    str, typer.Option("--disk-kv-dir", envvar="BATON_DISK_KV_DIR",
                      help="Directory for the disk KV tier (reused after a restart); empty: off.")
]
DiskKvBlocks = Annotated[
    int, typer.Option("--disk-kv-blocks", envvar="BATON_DISK_KV_BLOCKS", help="KV blocks the disk tier may hold.")
]
KvEviction = Annotated[
    str, typer.Option("--kv-eviction", envvar="BATON_KV_EVICTION", help="Eviction in the host/disk tiers: lru or s3fifo.")
]
Dtype = Annotated[
    str, typer.Option("--dtype", envvar="BATON_DTYPE",
                      help="Weights and KV dtype: auto (the checkpoint's: fp32 built-ins stay fp32, a bf16 checkpoint runs bf16), float32, bfloat16 (about 1.4x faster than fp32 on CPUs with AVX512-BF16) or float16 (bf16 on CPU).")
]

# --- every service -------------------------------------------------------------------------
LogFormat = Annotated[
    str, typer.Option("--log-format", envvar="BATON_LOG_FORMAT",
                      help="text, or json: one JSON object a line (service, pid, request_id, trace_id).")
]
DrainTimeout = Annotated[
    float, typer.Option("--drain-timeout", envvar="BATON_DRAIN_TIMEOUT",
                        help="On SIGTERM, seconds to finish in-flight work before stopping (keep it below "
                             "the orchestrator's grace period: compose 35 s, Helm terminationGracePeriodSeconds).")
]

# KV transport of the workers (decode receives blocks, prefill sends them).
KvTransportKind = Annotated[
    str, typer.Option("--kv-transport", envvar="BATON_KV_TRANSPORT",
                      help="KV transport: tcp, or ucx (needs the ucx extra).")
]
KvHost = Annotated[
    str, typer.Option("--kv-host", envvar="BATON_KV_HOST",
                      help="Address peers dial to reach this worker's KV transport (advertised; compose: the "
                           "service name, Helm: the pod IP).")
]
KvBindHost = Annotated[
    str, typer.Option("--kv-bind-host", envvar="BATON_KV_BIND_HOST",
                      help="Address the KV transport listens on (default: 127.0.0.1 if --kv-host is loopback, "
                           "else 0.0.0.0).")
]

# The router's policy, for the router service and for a frontend that embeds it (--router embedded):
# the same environment variables configure both.
RouterMode = Annotated[
    str, typer.Option(envvar="BATON_ROUTER_MODE",
                      help="Routing policy: kv, kv-approx (no KV events needed), round-robin or random.")
]
RouterSeed = Annotated[int | None, typer.Option(envvar="BATON_ROUTER_SEED", help="Seed for random choices.")]
RouterOverlapWeight = Annotated[float, typer.Option(
    envvar="BATON_ROUTER_OVERLAP_WEIGHT", help="kv: weight of blocks to prefill against blocks in use in a worker's cost.")]
RouterLowerTierWeight = Annotated[float, typer.Option(
    envvar="BATON_ROUTER_LOWER_TIER_WEIGHT",
    help="kv: cost of a prefix block found in a worker's host/disk tier, as a share of recomputing it.")]
RouterTemperature = Annotated[float, typer.Option(
    envvar="BATON_ROUTER_TEMPERATURE", help="kv: 0 picks the cheapest worker; > 0 samples (softmax).")]
RouterPredictionTtl = Annotated[float, typer.Option(
    envvar="BATON_ROUTER_PREDICTION_TTL",
    help="kv: seconds a routed prompt counts as cached on its worker before events say so "
         "(0: 10 s for kv, 120 s for kv-approx).")]
RouterSnapshotInterval = Annotated[float, typer.Option(
    envvar="BATON_ROUTER_SNAPSHOT_INTERVAL", help="kv: seconds between index snapshots (0: none).")]
RouterCatchupTimeout = Annotated[float, typer.Option(
    envvar="BATON_ROUTER_CATCHUP_TIMEOUT",
    help="kv: at start, wait this long at most for the KV events replay before routing.")]
RouterSessionTtl = Annotated[float, typer.Option(
    envvar="BATON_ROUTER_SESSION_TTL",
    help="Seconds a session (x-session-id header) stays on its worker after its last request; 0: no affinity.")]
