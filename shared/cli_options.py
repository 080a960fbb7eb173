"""The CLI options every service shares; each also reads a ``BATON_*`` variable.

Each service's Typer CLI declares its options with these types, so ``--nats-url`` and
``BATON_NATS_URL`` mean the same thing everywhere. The engine workers (decode, prefill) take one
set of worker and engine options through :func:`worker_command`, which hands the command one
:class:`WorkerOptions` holding the whole :class:`~shared.engines.EngineConfig`; a launcher (``baton
up``, the planner's local connector) spells an engine config back as flags with :func:`engine_argv`.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from shared.engines import EngineConfig
    from shared.runtime import Actor

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"

NatsUrl = Annotated[
    str, typer.Option("--nats-url", envvar="BATON_NATS_URL",
                      help="NATS server URL (JetStream enabled); several servers of a cluster comma-separated "
                           "(nats://a:4222,nats://b:4222): the services fail over between them.")
]


def _export_js_replicas(n: int | None) -> int | None:
    # Read by the bus (shared.bus.js_replicas_from_env) wherever a stream or bucket is created.
    if n is not None:
        if not 1 <= n <= 5:
            raise typer.BadParameter("must be 1..5 (JetStream's range)")
        os.environ["BATON_JS_REPLICAS"] = str(n)
    return n


JsReplicas = Annotated[
    int | None,
    typer.Option("--js-replicas", envvar="BATON_JS_REPLICAS", callback=_export_js_replicas,
                 help="Replicas of every JetStream stream and bucket Baton creates (1; 3 on a 3-server "
                      "cluster). One that exists with fewer is reported, not silently reused."),
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
# (named EngineName: shared.engines.Engine is the engine base class)
EngineName = Annotated[str, typer.Option("--engine", envvar="BATON_ENGINE", help="torch, mocker or vllm.")]
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
MaxLoras = Annotated[
    int, typer.Option("--max-loras", envvar="BATON_MAX_LORAS",
                      help="LoRA adapters resident at once (torch, mocker); more are loaded on demand, least "
                           "recently used evicted. 0: serve no adapters.")
]
MaxLoraRank = Annotated[
    int, typer.Option("--max-lora-rank", envvar="BATON_MAX_LORA_RANK", help="Largest LoRA rank accepted (400 above).")
]
LoraModules = Annotated[
    str, typer.Option("--lora-modules", envvar="BATON_LORA_MODULES",
                      help="LoRA adapters to load at start: name=path[,name=path...] (PEFT directories).")
]
MockerLoraLoadS = Annotated[
    float, typer.Option("--mocker-lora-load-s", envvar="BATON_MOCKER_LORA_LOAD_S",
                        help="Mocker: simulated seconds to make a LoRA adapter resident (divided by the speedup).")
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
TorchThreads = Annotated[
    int, typer.Option("--torch-threads", envvar="BATON_TORCH_THREADS", min=0,
                      help="The torch engine's matmul threads (0: the CPUs this process may run on). Engines "
                           "sharing a host's CPUs need a share each; baton up and the planner set it for theirs.")
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


# --- the engine workers' command ---------------------------------------------------------------

# Engine option -> EngineConfig field, in --help order. The one place an engine flag is named.
ENGINE_OPTIONS: dict[str, tuple[str, Any]] = {
    "engine": ("--engine", EngineName),
    "model": ("--model", Model),
    "dtype": ("--dtype", Dtype),
    "block_size": ("--block-size", BlockSize),
    "num_blocks": ("--num-blocks", NumBlocks),
    "max_num_seqs": ("--max-num-seqs", MaxNumSeqs),
    "max_batched_tokens": ("--max-batched-tokens", MaxBatchedTokens),
    "speedup": ("--mocker-speedup", MockerSpeedup),
    "host_kv_blocks": ("--host-kv-blocks", HostKvBlocks),
    "disk_kv_dir": ("--disk-kv-dir", DiskKvDir),
    "disk_kv_blocks": ("--disk-kv-blocks", DiskKvBlocks),
    "kv_eviction": ("--kv-eviction", KvEviction),
    "max_loras": ("--max-loras", MaxLoras),
    "max_lora_rank": ("--max-lora-rank", MaxLoraRank),
    "lora_modules": ("--lora-modules", LoraModules),
    "lora_load_s": ("--mocker-lora-load-s", MockerLoraLoadS),
}


def engine_argv(config: EngineConfig, fields: Collection[str] | None = None) -> list[str]:
    """A launcher's engine config as worker flags: ``fields`` of it (default: every engine option)."""
    names = ENGINE_OPTIONS if fields is None else [f for f in ENGINE_OPTIONS if f in fields]
    return [arg for f in names for arg in (ENGINE_OPTIONS[f][0], str(getattr(config, f)))]


@dataclass
class WorkerOptions:
    """What a worker CLI was told, besides its role's own options: the engine config whole."""

    engine: EngineConfig
    nats_url: str
    served_model_name: str | None
    worker_id: str | None
    kv_transport: str
    kv_host: str
    kv_bind_host: str
    discovery_ttl: float
    metrics_port: int
    log_level: str
    log_format: str
    drain_timeout: float

    def settings(self) -> dict[str, Any]:
        """The fields of ``shared.worker_host.WorkerSettings``."""
        return {"nats_url": self.nats_url, "engine": self.engine, "worker_id": self.worker_id,
                "served_model_name": self.served_model_name, "discovery_ttl": self.discovery_ttl,
                "metrics_port": self.metrics_port, "kv_transport": self.kv_transport, "kv_host": self.kv_host,
                "kv_bind_host": self.kv_bind_host}

    def run(self, role: str, actor: Callable[[], Actor]) -> None:
        """Check what can be checked before start (exit 2 with one line), then run the worker."""
        from shared.preflight import check_engine, check_model, check_port, run_checks
        from shared.runtime import run_service

        run_checks(role, [lambda: check_engine(self.engine.engine), lambda: check_model(self.engine.model),
                          lambda: check_port("0.0.0.0", self.metrics_port, "metrics", "--metrics-port")])
        run_service(actor(), role, self.log_level, self.drain_timeout, self.log_format)


def _option(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def worker_command(command: Callable[..., None]) -> Callable[..., None]:
    """Give a worker CLI the options every engine worker takes, around its own; the command gets
    them as ``worker: WorkerOptions`` (one EngineConfig built once, here)."""
    from shared.builtin_model import DEFAULT_MODEL
    from shared.discovery import DEFAULT_TTL

    defaults = {"engine": "torch", "model": DEFAULT_MODEL, "dtype": "auto", "block_size": 16, "num_blocks": 0,
                "max_num_seqs": 64, "max_batched_tokens": 512, "speedup": 1.0, "host_kv_blocks": 0,
                "disk_kv_dir": "", "disk_kv_blocks": 0, "kv_eviction": "lru", "max_loras": 4, "max_lora_rank": 64,
                "lora_modules": "", "lora_load_s": 0.05}
    engine_params = {f: {"speedup": "mocker_speedup", "lora_load_s": "mocker_lora_load_s"}.get(f, f)
                     for f in ENGINE_OPTIONS}
    head = [_option("nats_url", NatsUrl, DEFAULT_NATS_URL), _option("nats_creds", NatsCreds, None),
            _option("js_replicas", JsReplicas, None),
            _option("model", Model, DEFAULT_MODEL), _option("served_model_name", ServedModelName, None),
            *(_option(p, ENGINE_OPTIONS[f][1], defaults[f]) for f, p in engine_params.items() if f != "model"),
            _option("worker_id", WorkerId, None)]
    tail = [_option("kv_transport", KvTransportKind, "tcp"), _option("kv_host", KvHost, "127.0.0.1"),
            _option("kv_bind_host", KvBindHost, ""), _option("discovery_ttl", DiscoveryTtl, DEFAULT_TTL),
            _option("metrics_port", MetricsPort, 0), _option("log_level", LogLevel, "info"),
            _option("log_format", LogFormat, "text"), _option("drain_timeout", DrainTimeout, 30.0),
            _option("torch_threads", TorchThreads, 0)]
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
           for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "worker"]
    params = [*head, *own, *tail]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        from shared.engines import EngineConfig
        from shared.engines.cpu_threads import THREADS_ENV

        engine = EngineConfig(**{f: kwargs.pop(p) for f, p in engine_params.items()})
        kwargs.pop("nats_creds")  # its callback exported it for the bus
        kwargs.pop("js_replicas")  # likewise
        threads = kwargs.pop("torch_threads")
        if threads:  # read where the engine sets its threads (shared/engines/cpu_threads.py)
            os.environ[THREADS_ENV] = str(threads)
        common = {p.name: kwargs.pop(p.name) for p in (*head, *tail) if p.name in kwargs}
        command(worker=WorkerOptions(engine=engine, **common), **kwargs)

    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper

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
RouterLoraLoadWeight = Annotated[float, typer.Option(
    envvar="BATON_ROUTER_LORA_LOAD_WEIGHT",
    help="kv: cost, in KV blocks, of sending a request to a worker that does not hold its LoRA adapter "
         "resident (it must load it first); 0: adapter-blind.")]
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
RouterLeaseTtl = Annotated[float, typer.Option(
    envvar="BATON_ROUTER_LEASE_TTL",
    help="round-robin and random: seconds a frontend may use decisions granted ahead (route leases, no "
         "route hop per request); 0: decide every request here.")]
